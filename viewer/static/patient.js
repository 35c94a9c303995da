// The patient's digital film page (/s/{token}). No build step: plain JavaScript.
// Images are JPEGs rendered by the server (/dicomweb/.../rendered), windowed server-side.
"use strict";
(function () {
  const app = document.getElementById("app");
  const boot = JSON.parse(document.getElementById("share-data").textContent);
  const storeKey = "pacs-share-" + boot.token;
  const SIZE = Math.min(window.innerWidth, window.innerHeight) <= 600 ? 512 : 1024;

  const el = (tag, attrs, ...children) => {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (k === "onclick") node.addEventListener("click", v);
      else if (v !== null && v !== undefined && v !== false) node.setAttribute(k, v === true ? "" : v);
    }
    for (const child of children) if (child !== null && child !== undefined)
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    return node;
  };

  // ------------------------------------------------------------ the session (PIN first)

  function start() {
    if (boot.session) return show(boot.session);
    const saved = JSON.parse(sessionStorage.getItem(storeKey) || "null");
    if (saved && Date.parse(saved.session_expires_at) > Date.now() + 60000) return show(saved);
    askPin();
  }

  function askPin(message) {
    const input = el("input", {type: "password", inputmode: "numeric", autocomplete: "one-time-code",
                               pattern: "[0-9]*", maxlength: "8", "aria-label": "Mã PIN", required: true});
    const error = el("p", {class: "error", role: "alert"}, message || "");
    const form = el("form", {},
      el("label", {}, "Nhập mã PIN in trên phiếu kết quả để xem ảnh:"), input,
      el("button", {type: "submit"}, "Xem ảnh"), error);
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const response = await fetch(`/api/s/${encodeURIComponent(boot.token)}/session`, {
        method: "POST", headers: {"Content-Type": "application/json"},
        body: JSON.stringify({pin: input.value.trim()})});
      const body = await response.json().catch(() => ({message: "Lỗi máy chủ"}));
      if (response.ok) {
        sessionStorage.setItem(storeKey, JSON.stringify(body));
        return show(body);
      }
      if (response.status === 423 || response.status === 410 || response.status === 404) {
        app.replaceChildren(el("main", {class: "message"}, el("h1", {}, "Không mở được ảnh"),
                                el("p", {}, body.message)));
        return;
      }
      error.textContent = body.message;
      input.value = "";
    });
    app.replaceChildren(header(null), el("main", {class: "pin message"}, form));
    input.focus();
  }

  function header(study) {
    const site = el("div", {class: "site"}, boot.site_name);
    if (!study) return el("header", {}, site, el("h1", {}, "Ảnh chụp chẩn đoán"));
    const who = [study.patient_birth_date && "Ngày sinh " + study.patient_birth_date,
                 study.patient_sex].filter(Boolean).join(" · ");
    const what = [study.study_date, study.modalities.join(", "), study.study_description]
      .filter(Boolean).join(" · ");
    return el("header", {}, site, el("h1", {}, study.patient_name || "—"),
              el("div", {class: "meta"}, who), el("div", {class: "meta"}, what));
  }

  // ------------------------------------------------------------ the viewer

  function show(session) {
    const study = session.study;
    const token = session.access_token;
    // Each "strip": a list of [series uid, sop uid, frame]; key images first when present.
    const strips = [];
    if (study.key_images.length)
      strips.push({title: `Ảnh chính (${study.key_images.length})`, items: study.key_images,
                   presets: presetsOf(study.key_images[0][0])});
    for (const s of study.series) {
      const items = [];
      for (const [sop, frames] of s.images)
        for (let f = 1; f <= frames; f++) items.push([s.uid, sop, f]);
      const label = [s.number != null && `Loạt ${s.number}`, s.modality, s.description]
        .filter(Boolean).join(" · ");
      strips.push({title: `${label} (${items.length} ảnh)`, items, presets: s.presets,
                   start: middleIndex(s.images)});
    }
    function presetsOf(seriesUid) {
      const s = study.series.find((x) => x.uid === seriesUid);
      return s ? s.presets : [["Mặc định", null]];
    }
    function middleIndex(images) {
      // The middle instance's first frame, as first_image_url() picks it on the server.
      let index = 0;
      for (let i = 0; i < Math.floor(images.length / 2); i++) index += images[i][1];
      return index;
    }
    if (!strips.length) {
      app.replaceChildren(header(study), el("main", {class: "message"},
        el("p", {}, "Ca chụp này không có ảnh để hiển thị.")));
      return;
    }

    const state = {strip: 0, index: strips[0].start || 0, preset: 0, zoom: 1, panX: 0, panY: 0};
    const image = el("img", {alt: "Ảnh chụp", id: "image", decoding: "async"});
    const topLeft = el("span"), topRight = el("span"), bottomLeft = el("span");
    const stage = el("div", {id: "stage", "aria-label": "Ảnh; vuốt ngang để chuyển lát cắt"}, image,
      el("div", {class: "overlay top"}, topLeft, topRight),
      el("div", {class: "overlay bottom"}, bottomLeft));
    const slider = el("input", {type: "range", min: "0", value: "0", "aria-label": "Lát cắt"});
    const prev = el("button", {class: "step", "aria-label": "Ảnh trước", onclick: () => go(state.index - 1)}, "‹");
    const next = el("button", {class: "step", "aria-label": "Ảnh sau", onclick: () => go(state.index + 1)}, "›");
    const presetBar = el("div", {class: "presets", role: "toolbar", "aria-label": "Cửa sổ hiển thị"});
    slider.addEventListener("input", () => go(Number(slider.value)));

    function url(item, window_, size) {
      const [seriesUid, sop, frame] = item;
      let query = `viewport=${size},${size}&quality=85`;
      if (window_) query += `&window=${window_[0]},${window_[1]}`;
      return `/dicomweb/studies/${study.study_instance_uid}/series/${seriesUid}/instances/` +
             `${sop}/frames/${frame}/rendered?${query}&access_token=${encodeURIComponent(token)}`;
    }
    function currentWindow() {
      const presets = strips[state.strip].presets;
      return (presets[state.preset] || presets[0])[1];
    }
    function render() {
      const strip = strips[state.strip];
      const item = strip.items[state.index];
      image.src = url(item, currentWindow(), SIZE);
      image.dataset.index = String(state.index);
      slider.max = String(strip.items.length - 1);
      slider.value = String(state.index);
      topLeft.textContent = strip.title.replace(/ \(\d+ ảnh\)$/, "");
      topRight.textContent = `${state.index + 1}/${strip.items.length}`;
      bottomLeft.textContent = strip.presets[state.preset] ? strip.presets[state.preset][0] : "";
      for (const [i, thumbs] of thumbStrips.entries())
        for (const button of thumbs.children)
          button.setAttribute("aria-current", String(i === state.strip && Number(button.dataset.index) === state.index));
      // Neighbours ahead of time, so scrolling does not wait on the network.
      for (const step of [1, -1, 2, 3]) {
        const neighbour = strip.items[state.index + step];
        if (neighbour) new Image().src = url(neighbour, currentWindow(), SIZE);
      }
    }
    function go(index) {
      const count = strips[state.strip].items.length;
      const clamped = Math.max(0, Math.min(count - 1, index));
      if (clamped !== state.index) { state.index = clamped; render(); }
    }
    function choose(stripIndex, index) {
      state.strip = stripIndex;
      state.index = index;
      if (state.preset >= strips[stripIndex].presets.length) state.preset = 0;
      drawPresets();
      resetZoom();
      render();
      stage.scrollIntoView({block: "nearest", behavior: "smooth"});
    }
    function drawPresets() {
      presetBar.replaceChildren(...strips[state.strip].presets.map(([name], i) =>
        el("button", {"aria-pressed": String(i === state.preset), onclick: () => {
          state.preset = i; drawPresets(); render(); }}, name)));
      presetBar.hidden = strips[state.strip].presets.length < 2;
    }

    // Swipe (drag) across the image to move through slices; pinch to zoom, drag to pan
    // once zoomed; double tap to reset. Pointer events cover touch, pen and mouse.
    const pointers = new Map();
    let drag = null, pinch = null, lastTap = 0;
    stage.addEventListener("pointerdown", (event) => {
      stage.setPointerCapture(event.pointerId);
      pointers.set(event.pointerId, {x: event.clientX, y: event.clientY});
      if (pointers.size === 1) {
        drag = {x: event.clientX, y: event.clientY, index: state.index, panX: state.panX, panY: state.panY};
        const now = Date.now();
        if (now - lastTap < 300) resetZoom();
        lastTap = now;
      } else if (pointers.size === 2) {
        const [a, b] = [...pointers.values()];
        pinch = {distance: Math.hypot(a.x - b.x, a.y - b.y), zoom: state.zoom};
        drag = null;
      }
    });
    stage.addEventListener("pointermove", (event) => {
      if (!pointers.has(event.pointerId)) return;
      pointers.set(event.pointerId, {x: event.clientX, y: event.clientY});
      if (pinch && pointers.size === 2) {
        const [a, b] = [...pointers.values()];
        state.zoom = Math.max(1, Math.min(6, pinch.zoom * Math.hypot(a.x - b.x, a.y - b.y) / pinch.distance));
        applyZoom();
      } else if (drag) {
        const dx = event.clientX - drag.x, dy = event.clientY - drag.y;
        if (state.zoom > 1) {
          state.panX = drag.panX + dx; state.panY = drag.panY + dy; applyZoom();
        } else {
          // About the whole series over two widths of the image, at least one slice per 12 px.
          const count = strips[state.strip].items.length;
          const perSlice = Math.max(4, Math.min(12, (2 * stage.clientWidth) / count));
          go(drag.index - Math.round(dx / perSlice));
        }
      }
    });
    const release = (event) => {
      pointers.delete(event.pointerId);
      if (pointers.size < 2) pinch = null;
      if (pointers.size === 0) drag = null;
    };
    stage.addEventListener("pointerup", release);
    stage.addEventListener("pointercancel", release);
    stage.addEventListener("wheel", (event) => {
      event.preventDefault();
      go(state.index + Math.sign(event.deltaY));
    }, {passive: false});
    document.addEventListener("keydown", (event) => {
      if (event.key === "ArrowRight" || event.key === "ArrowDown") go(state.index + 1);
      if (event.key === "ArrowLeft" || event.key === "ArrowUp") go(state.index - 1);
    });
    function applyZoom() {
      image.style.transform = state.zoom > 1
        ? `translate(${state.panX}px,${state.panY}px) scale(${state.zoom})` : "";
    }
    function resetZoom() { state.zoom = 1; state.panX = 0; state.panY = 0; applyZoom(); }

    // Thumbnail strips: at most 12 per series, evenly spaced; a tap opens that slice.
    const thumbStrips = [];
    const sections = strips.map((strip, stripIndex) => {
      const count = strip.items.length;
      const picks = count <= 12 ? [...Array(count).keys()]
        : [...new Set([...Array(12).keys()].map((i) => Math.round(i * (count - 1) / 11)))];
      const thumbs = el("div", {class: "thumbs"}, ...picks.map((index) =>
        el("button", {"data-index": String(index), "aria-label": `Ảnh ${index + 1}`,
                      onclick: () => choose(stripIndex, index)},
          el("img", {loading: "lazy", alt: "", width: "72", height: "72",
                     src: url(strip.items[index], null, 96)}))));
      thumbStrips.push(thumbs);
      return el("section", {class: "strip"}, el("h2", {}, strip.title), thumbs);
    });

    const actions = el("div", {class: "actions"});
    if (session.allow_download) {
      const base = `/api/studies/${study.study_instance_uid}/download`;
      const tokenQuery = `access_token=${encodeURIComponent(token)}`;
      actions.append(
        el("a", {class: "button", href: `${base}?format=jpeg&${tokenQuery}`, download: ""}, "Tải ảnh JPEG (.zip)"),
        el("a", {class: "button", href: `${base}?format=dicom&${tokenQuery}`, download: ""}, "Tải DICOM gốc (.zip)"));
    }
    actions.append(el("a", {class: "button doctor", href: session.viewer_url, target: "_blank",
                            rel: "noopener"}, "Trình xem chuyên sâu (bác sĩ)"));
    // The moment the link ends, as the slip gives it: to the minute, not "to the end of the day".
    const end = new Date(session.share_expires_at);
    const expires = end.toLocaleTimeString("vi-VN", {hour: "2-digit", minute: "2-digit"}) +
      " ngày " + end.toLocaleDateString("vi-VN");

    app.replaceChildren(header(study), stage,
      el("div", {class: "controls"}, prev, slider, next), presetBar, ...sections, actions,
      el("footer", {}, `Liên kết có hiệu lực đến ${expires}. Vuốt ngang trên ảnh để chuyển lát cắt; ` +
                       "chụm hai ngón để phóng to, chạm đúp để trở lại."));
    drawPresets();
    render();
  }

  start();
})();

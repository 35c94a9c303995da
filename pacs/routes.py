"""One Starlette route per path, whatever the number of handlers behind it."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Route


def merged_by_path(routes: Sequence[BaseRoute]) -> list[BaseRoute]:
    """``routes`` with those of one path (a handler per method) made one route.

    A request with a method the path does not allow is answered 405 by the first route of its
    path alone, whose ``Allow`` then named that route's methods only (``PUT /studies`` said
    ``GET, HEAD``, not POST); RFC 9110 15.5.6 asks for every method the resource supports."""
    by_path: dict[str, list[Route]] = {}
    out: list[BaseRoute | str] = []
    for route in routes:
        if type(route) is not Route:  # mounts and the like stay as they are
            out.append(route)
            continue
        if route.path not in by_path:
            by_path[route.path] = []
            out.append(route.path)
        by_path[route.path].append(route)
    return [by_path[item][0] if isinstance(item, str) and len(by_path[item]) == 1
            else _one_route(by_path[item]) if isinstance(item, str) else item for item in out]


def _one_route(routes: list[Route]) -> Route:
    handlers = {}
    for route in routes:
        if not inspect.iscoroutinefunction(route.endpoint):
            raise TypeError(f"{route.path}: {route.endpoint!r} is not an async function")
        for method in route.methods or ():
            handlers.setdefault(method, route.endpoint)

    async def by_method(request: Request) -> Response:
        return await handlers[request.method](request)

    return Route(routes[0].path, by_method, methods=list(handlers), name=routes[0].name)

"""Person names with component groups: the accent-folded column keeps the groups apart

``Phạm^Thị Hoa=范^氏花`` was folded to ``pham thi hoa 范 氏花``, so no query could tell its
alphabetic group from the rest and ``pham thi hoa`` did not find it; it is now folded to
``pham thi hoa=范 氏花`` (storage.names.fold_person_name). Only names holding ``=`` (or a
full-width ``＝`` or ``＾``, which folding turns into ``=`` and ``^``) change.

Names are now matched by a prefix range of these columns (LIKE 'pham thi hoa%'), which a
PostgreSQL b-tree index serves only with text_pattern_ops: the worklist's patient name indexes
become pattern indexes like the archive's.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 10:00:00.000000
"""

from collections.abc import Callable

from alembic import op
import sqlalchemy as sa

from storage.names import fold_person_name, fold_text


revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None

# (table, PN column): each has a "<column>_fold" column beside it.
_PERSON_NAMES = (
    ('patients', 'patient_name'),
    ('studies', 'referring_physician_name'),
    ('emr_patients', 'name'),
)


def upgrade() -> None:
    _refold(fold_person_name)
    with op.batch_alter_table('emr_patients', schema=None) as batch_op:
        batch_op.drop_index('ix_emr_patients_name_fold')
        batch_op.create_index('ix_emr_patients_name_fold', ['name_fold'], unique=False,
                              postgresql_ops={'name_fold': 'text_pattern_ops'})
        batch_op.create_index('ix_emr_patients_name_ci', ['name_ci'], unique=False,
                              postgresql_ops={'name_ci': 'text_pattern_ops'})


def downgrade() -> None:
    with op.batch_alter_table('emr_patients', schema=None) as batch_op:
        batch_op.drop_index('ix_emr_patients_name_ci')
        batch_op.drop_index('ix_emr_patients_name_fold')
        batch_op.create_index('ix_emr_patients_name_fold', ['name_fold'], unique=False)
    _refold(_fold_groups_together)


def _fold_groups_together(name: str) -> str:
    """The fold before 0006: components and component groups alike became spaces."""
    return ' '.join(fold_text(name.replace('^', ' ').replace('=', ' ')).split())


def _refold(fold: Callable[[str], str]) -> None:
    conn = op.get_bind()
    for table_name, column in _PERSON_NAMES:
        table = sa.table(table_name, sa.column('pk'), sa.column(column),
                         sa.column(column + '_fold'))
        # Full-width ＝ and ＾ fold to = and ^ (NFKD): the old fold kept them as such.
        rows = conn.execute(sa.select(table.c.pk, table.c[column]).where(sa.or_(
            *(table.c[column].like(f'%{sign}%') for sign in ('=', '＝', '＾'))))).all()
        if rows:
            conn.execute(table.update().where(table.c.pk == sa.bindparam('row_pk'))
                         .values({column + '_fold': sa.bindparam('row_fold')}),
                         [{'row_pk': pk, 'row_fold': fold(name)} for pk, name in rows])

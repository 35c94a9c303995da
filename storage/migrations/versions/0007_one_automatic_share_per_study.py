"""One automatic share per study: a unique index, so two nodes cannot both make one

Two nodes completing the same study at the same moment each found no automatic share and
each made one: two QR codes for one patient. A unique partial index on the study of the
shares ``created_by`` 'auto' now refuses the second (storage.shares.AutomaticShareExists).

Studies that already have more than one keep them all (their slips may have been handed
out): the oldest stays 'auto', the others become 'auto (duplicate)'.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-08 10:00:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None

_AUTOMATIC = "created_by = 'auto'"


def upgrade() -> None:
    shares = sa.table('shares', sa.column('pk'), sa.column('study_instance_uid'),
                      sa.column('created_by'))
    oldest = (sa.select(sa.func.min(shares.c.pk)).where(shares.c.created_by == 'auto')
              .group_by(shares.c.study_instance_uid))
    op.get_bind().execute(shares.update().where(shares.c.created_by == 'auto',
                                                shares.c.pk.not_in(oldest))
                          .values(created_by='auto (duplicate)'))
    op.create_index('uq_shares_automatic', 'shares', ['study_instance_uid'], unique=True,
                    sqlite_where=sa.text(_AUTOMATIC), postgresql_where=sa.text(_AUTOMATIC))


def downgrade() -> None:
    op.drop_index('uq_shares_automatic', table_name='shares')

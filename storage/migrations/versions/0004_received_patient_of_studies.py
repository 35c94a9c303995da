"""The Patient ID a study arrived with, to refuse instances of another patient

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 04:40:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.add_column(sa.Column('received_patient_id', sa.Text(), nullable=True))
        batch_op.add_column(sa.Column('received_issuer_of_patient_id', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_column('received_issuer_of_patient_id')
        batch_op.drop_column('received_patient_id')

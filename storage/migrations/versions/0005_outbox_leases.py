"""Outbox leases: one server node at a time sends a destination's deliveries

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 09:40:00.000000
"""

from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'outbox_leases',
        sa.Column('destination', sa.Text(), nullable=False),
        sa.Column('holder', sa.String(length=128), nullable=False),
        sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint('destination'),
    )


def downgrade() -> None:
    op.drop_table('outbox_leases')

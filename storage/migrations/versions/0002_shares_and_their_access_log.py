"""Shares (links to one study) and their access log.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 19:24:05.417679
"""

from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('shares',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('token_sha256', sa.String(length=64), nullable=False),
    sa.Column('nonce', sa.String(length=32), nullable=False),
    sa.Column('pin_kind', sa.String(length=16), server_default='', nullable=False),
    sa.Column('pin_hash', sa.Text(), nullable=True),
    sa.Column('pin_failures', sa.Integer(), server_default='0', nullable=False),
    sa.Column('pin_retry_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('locked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('allow_download', sa.Boolean(), server_default=sa.false(), nullable=False),
    sa.Column('created_by', sa.Text(), server_default='', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('expires_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('revoked_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('opened_count', sa.Integer(), server_default='0', nullable=False),
    sa.Column('first_opened_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_opened_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('token_sha256')
    )
    with op.batch_alter_table('shares', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_shares_study_instance_uid'), ['study_instance_uid'], unique=False)

    op.create_table('share_accesses',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('share_pk', sa.Integer(), nullable=False),
    sa.Column('at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('address', sa.Text(), server_default='', nullable=False),
    sa.Column('action', sa.String(length=32), nullable=False),
    sa.Column('detail', sa.Text(), server_default='', nullable=False),
    sa.Column('session', sa.String(length=32), server_default='', nullable=False),
    sa.ForeignKeyConstraint(['share_pk'], ['shares.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk')
    )
    with op.batch_alter_table('share_accesses', schema=None) as batch_op:
        batch_op.create_index('ix_share_accesses_at', ['at'], unique=False)
        batch_op.create_index(batch_op.f('ix_share_accesses_share_pk'), ['share_pk'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('share_accesses', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_share_accesses_share_pk'))
        batch_op.drop_index('ix_share_accesses_at')

    op.drop_table('share_accesses')
    with op.batch_alter_table('shares', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_shares_study_instance_uid'))

    op.drop_table('shares')

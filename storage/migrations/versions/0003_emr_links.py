"""EMR links: patients of the EMR, orders, study links, performed steps, outbox

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 17:42:10.536467
"""

from alembic import op
import sqlalchemy as sa


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('deliveries',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('destination', sa.Text(), nullable=False),
    sa.Column('kind', sa.String(length=16), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('payload', sa.Text(), nullable=False),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('attempts', sa.Integer(), server_default='0', nullable=False),
    sa.Column('next_attempt_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('last_error', sa.Text(), server_default='', nullable=False),
    sa.Column('delivered_at', sa.DateTime(timezone=True), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('pk')
    )
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.create_index('ix_deliveries_due', ['state', 'next_attempt_at'], unique=False)
        batch_op.create_index(batch_op.f('ix_deliveries_study_instance_uid'), ['study_instance_uid'], unique=False)

    op.create_table('emr_patients',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('patient_id', sa.String(length=64), nullable=False),
    sa.Column('issuer', sa.String(length=64), server_default='', nullable=False),
    sa.Column('name', sa.Text(), server_default='', nullable=False),
    sa.Column('name_ci', sa.Text(), server_default='', nullable=False),
    sa.Column('name_fold', sa.Text(), server_default='', nullable=False),
    sa.Column('birth_date', sa.String(length=8), server_default='', nullable=False),
    sa.Column('sex', sa.String(length=4), server_default='', nullable=False),
    sa.Column('cccd', sa.String(length=32), server_default='', nullable=False),
    sa.Column('bhyt', sa.String(length=32), server_default='', nullable=False),
    sa.Column('address', sa.Text(), server_default='', nullable=False),
    sa.Column('phone', sa.String(length=64), server_default='', nullable=False),
    sa.Column('merged_into_pk', sa.Integer(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['merged_into_pk'], ['emr_patients.pk'], ),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('patient_id', 'issuer', name='uq_emr_patients_identity')
    )
    with op.batch_alter_table('emr_patients', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_emr_patients_bhyt'), ['bhyt'], unique=False)
        batch_op.create_index(batch_op.f('ix_emr_patients_cccd'), ['cccd'], unique=False)
        batch_op.create_index('ix_emr_patients_name_fold', ['name_fold'], unique=False)

    op.create_table('orders',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('accession_number', sa.String(length=64), nullable=False),
    sa.Column('patient_pk', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('placer_order_number', sa.Text(), server_default='', nullable=False),
    sa.Column('filler_order_number', sa.Text(), server_default='', nullable=False),
    sa.Column('requested_procedure_id', sa.Text(), server_default='', nullable=False),
    sa.Column('scheduled_step_id', sa.Text(), server_default='', nullable=False),
    sa.Column('modality', sa.Text(), server_default='', nullable=False),
    sa.Column('station_ae_title', sa.Text(), server_default='', nullable=False),
    sa.Column('station_name', sa.Text(), server_default='', nullable=False),
    sa.Column('scheduled_date', sa.Text(), server_default='', nullable=False),
    sa.Column('scheduled_time', sa.Text(), server_default='', nullable=False),
    sa.Column('procedure_code', sa.Text(), server_default='', nullable=False),
    sa.Column('procedure_code_system', sa.Text(), server_default='', nullable=False),
    sa.Column('procedure_description', sa.Text(), server_default='', nullable=False),
    sa.Column('reason', sa.Text(), server_default='', nullable=False),
    sa.Column('priority', sa.Text(), server_default='', nullable=False),
    sa.Column('referring_physician', sa.Text(), server_default='', nullable=False),
    sa.Column('performing_physician', sa.Text(), server_default='', nullable=False),
    sa.Column('body_part', sa.Text(), server_default='', nullable=False),
    sa.Column('study_instance_uid', sa.Text(), server_default='', nullable=False),
    sa.Column('source', sa.Text(), server_default='', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_pk'], ['emr_patients.pk'], ),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('accession_number')
    )
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_orders_patient_pk'), ['patient_pk'], unique=False)
        batch_op.create_index('ix_orders_worklist', ['status', 'scheduled_date'], unique=False)

    op.create_table('performed_steps',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('order_pk', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=16), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), server_default='', nullable=False),
    sa.Column('attributes', sa.Text(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['order_pk'], ['orders.pk'], ),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    with op.batch_alter_table('performed_steps', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_performed_steps_order_pk'), ['order_pk'], unique=False)

    op.create_table('study_links',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('order_pk', sa.Integer(), nullable=True),
    sa.Column('state', sa.String(length=16), nullable=False),
    sa.Column('reason', sa.Text(), server_default='', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['order_pk'], ['orders.pk'], ),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('study_instance_uid')
    )
    with op.batch_alter_table('study_links', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_study_links_order_pk'), ['order_pk'], unique=False)
        batch_op.create_index('ix_study_links_state', ['state'], unique=False)



def downgrade() -> None:
    with op.batch_alter_table('study_links', schema=None) as batch_op:
        batch_op.drop_index('ix_study_links_state')
        batch_op.drop_index(batch_op.f('ix_study_links_order_pk'))

    op.drop_table('study_links')
    with op.batch_alter_table('performed_steps', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_performed_steps_order_pk'))

    op.drop_table('performed_steps')
    with op.batch_alter_table('orders', schema=None) as batch_op:
        batch_op.drop_index('ix_orders_worklist')
        batch_op.drop_index(batch_op.f('ix_orders_patient_pk'))

    op.drop_table('orders')
    with op.batch_alter_table('emr_patients', schema=None) as batch_op:
        batch_op.drop_index('ix_emr_patients_name_fold')
        batch_op.drop_index(batch_op.f('ix_emr_patients_cccd'))
        batch_op.drop_index(batch_op.f('ix_emr_patients_bhyt'))

    op.drop_table('emr_patients')
    with op.batch_alter_table('deliveries', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_deliveries_study_instance_uid'))
        batch_op.drop_index('ix_deliveries_due')

    op.drop_table('deliveries')

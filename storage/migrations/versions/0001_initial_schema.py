"""Initial schema: patients, studies, series, instances.

Revision ID: 0001
Revises:
Create Date: 2026-11-23 14:20:35.714206
"""

from alembic import op
import sqlalchemy as sa


revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('patients',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('patient_name', sa.Text(), nullable=True),
    sa.Column('patient_name_ci', sa.Text(), nullable=True),
    sa.Column('patient_name_fold', sa.Text(), nullable=True),
    sa.Column('patient_id', sa.Text(), server_default='', nullable=False),
    sa.Column('issuer_of_patient_id', sa.Text(), server_default='', nullable=False),
    sa.Column('patient_birth_date', sa.Text(), nullable=True),
    sa.Column('patient_birth_time', sa.Text(), nullable=True),
    sa.Column('patient_sex', sa.Text(), nullable=True),
    sa.Column('other_patient_ids', sa.Text(), nullable=True),
    sa.Column('num_studies', sa.Integer(), server_default='0', nullable=False),
    sa.Column('num_series', sa.Integer(), server_default='0', nullable=False),
    sa.Column('num_instances', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('patient_id', 'issuer_of_patient_id', name='uq_patients_identity')
    )
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.create_index('ix_patients_patient_id', ['patient_id'], unique=False, postgresql_ops={'patient_id': 'text_pattern_ops'})
        batch_op.create_index('ix_patients_patient_name_ci', ['patient_name_ci'], unique=False, postgresql_ops={'patient_name_ci': 'text_pattern_ops'})
        batch_op.create_index('ix_patients_patient_name_fold', ['patient_name_fold'], unique=False, postgresql_ops={'patient_name_fold': 'text_pattern_ops'})

    op.create_table('studies',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('patient_pk', sa.Integer(), nullable=False),
    sa.Column('study_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('study_date', sa.Text(), nullable=True),
    sa.Column('study_time', sa.Text(), nullable=True),
    sa.Column('accession_number', sa.Text(), nullable=True),
    sa.Column('study_id', sa.Text(), nullable=True),
    sa.Column('study_description', sa.Text(), nullable=True),
    sa.Column('referring_physician_name', sa.Text(), nullable=True),
    sa.Column('referring_physician_name_ci', sa.Text(), nullable=True),
    sa.Column('referring_physician_name_fold', sa.Text(), nullable=True),
    sa.Column('patient_age', sa.Text(), nullable=True),
    sa.Column('modalities_in_study', sa.Text(), nullable=True),
    sa.Column('num_series', sa.Integer(), server_default='0', nullable=False),
    sa.Column('num_instances', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['patient_pk'], ['patients.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('study_instance_uid')
    )
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.create_index('ix_studies_accession_number', ['accession_number'], unique=False, postgresql_ops={'accession_number': 'text_pattern_ops'})
        batch_op.create_index(batch_op.f('ix_studies_patient_pk'), ['patient_pk'], unique=False)
        batch_op.create_index('ix_studies_study_date', ['study_date'], unique=False)

    op.create_table('series',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('study_pk', sa.Integer(), nullable=False),
    sa.Column('series_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('modality', sa.Text(), nullable=True),
    sa.Column('series_number', sa.Integer(), nullable=True),
    sa.Column('series_description', sa.Text(), nullable=True),
    sa.Column('series_date', sa.Text(), nullable=True),
    sa.Column('series_time', sa.Text(), nullable=True),
    sa.Column('body_part_examined', sa.Text(), nullable=True),
    sa.Column('laterality', sa.Text(), nullable=True),
    sa.Column('protocol_name', sa.Text(), nullable=True),
    sa.Column('station_name', sa.Text(), nullable=True),
    sa.Column('manufacturer', sa.Text(), nullable=True),
    sa.Column('institution_name', sa.Text(), nullable=True),
    sa.Column('performed_procedure_step_start_date', sa.Text(), nullable=True),
    sa.Column('performed_procedure_step_start_time', sa.Text(), nullable=True),
    sa.Column('request_scheduled_procedure_step_id', sa.Text(), nullable=True),
    sa.Column('request_requested_procedure_id', sa.Text(), nullable=True),
    sa.Column('num_instances', sa.Integer(), server_default='0', nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['study_pk'], ['studies.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('series_instance_uid')
    )
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.create_index('ix_series_modality', ['modality'], unique=False)
        batch_op.create_index(batch_op.f('ix_series_study_pk'), ['study_pk'], unique=False)

    op.create_table('instances',
    sa.Column('pk', sa.Integer(), nullable=False),
    sa.Column('series_pk', sa.Integer(), nullable=False),
    sa.Column('sop_instance_uid', sa.String(length=64), nullable=False),
    sa.Column('sop_class_uid', sa.Text(), nullable=True),
    sa.Column('instance_number', sa.Integer(), nullable=True),
    sa.Column('content_date', sa.Text(), nullable=True),
    sa.Column('content_time', sa.Text(), nullable=True),
    sa.Column('pixel_rows', sa.Integer(), nullable=True),
    sa.Column('pixel_columns', sa.Integer(), nullable=True),
    sa.Column('bits_allocated', sa.Integer(), nullable=True),
    sa.Column('number_of_frames', sa.Integer(), nullable=True),
    sa.Column('transfer_syntax_uid', sa.String(length=64), nullable=False),
    sa.Column('blob_key', sa.String(length=255), nullable=False),
    sa.Column('size', sa.BigInteger(), nullable=False),
    sa.Column('sha256', sa.String(length=64), nullable=False),
    sa.Column('frames', sa.Text(), nullable=True),
    sa.Column('header', sa.Text(), nullable=False),
    sa.Column('stored_at', sa.DateTime(timezone=True), nullable=False),
    sa.ForeignKeyConstraint(['series_pk'], ['series.pk'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('pk'),
    sa.UniqueConstraint('blob_key'),
    sa.UniqueConstraint('sop_instance_uid')
    )
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_instances_series_pk'), ['series_pk'], unique=False)
        batch_op.create_index('ix_instances_sop_class_uid', ['sop_class_uid'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('instances', schema=None) as batch_op:
        batch_op.drop_index('ix_instances_sop_class_uid')
        batch_op.drop_index(batch_op.f('ix_instances_series_pk'))

    op.drop_table('instances')
    with op.batch_alter_table('series', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_series_study_pk'))
        batch_op.drop_index('ix_series_modality')

    op.drop_table('series')
    with op.batch_alter_table('studies', schema=None) as batch_op:
        batch_op.drop_index('ix_studies_study_date')
        batch_op.drop_index(batch_op.f('ix_studies_patient_pk'))
        batch_op.drop_index('ix_studies_accession_number', postgresql_ops={'accession_number': 'text_pattern_ops'})

    op.drop_table('studies')
    with op.batch_alter_table('patients', schema=None) as batch_op:
        batch_op.drop_index('ix_patients_patient_name_fold', postgresql_ops={'patient_name_fold': 'text_pattern_ops'})
        batch_op.drop_index('ix_patients_patient_name_ci', postgresql_ops={'patient_name_ci': 'text_pattern_ops'})
        batch_op.drop_index('ix_patients_patient_id', postgresql_ops={'patient_id': 'text_pattern_ops'})

    op.drop_table('patients')

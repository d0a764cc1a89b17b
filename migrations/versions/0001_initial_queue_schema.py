"""Initial queue schema: tenants, adapters, batches, jobs, queue_groups, workers.

Revision ID: 0001
Revises: 
Create Date: 2026-11-29 02:34:35.052332
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0001'
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table('queue_groups',
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('adapter_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=False, nullable=False),
    sa.Column('priority', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('queued_count', sa.Integer(), nullable=False),
    sa.Column('oldest_enqueued_at', sa.DateTime(), nullable=True),
    sa.PrimaryKeyConstraint('tenant_id', 'adapter_id', 'priority')
    )
    with op.batch_alter_table('queue_groups', schema=None) as batch_op:
        batch_op.create_index('ix_queue_groups_adapter', ['adapter_id'], unique=False, postgresql_where=sa.text('queued_count > 0'), sqlite_where=sa.text('queued_count > 0'))
        batch_op.create_index('ix_queue_groups_oldest', ['oldest_enqueued_at'], unique=False, postgresql_where=sa.text('queued_count > 0'), sqlite_where=sa.text('queued_count > 0'))
        batch_op.create_index('ix_queue_groups_tenant', ['tenant_id', 'priority', 'oldest_enqueued_at'], unique=False, postgresql_where=sa.text('queued_count > 0'), sqlite_where=sa.text('queued_count > 0'))

    op.create_table('tenants',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('key_id', sa.String(length=32), nullable=False),
    sa.Column('key_hash', sa.String(length=64), nullable=False),
    sa.Column('weight', sa.Float(), nullable=False),
    sa.Column('max_queued', sa.Integer(), nullable=True),
    sa.Column('served', sa.Float(), server_default=sa.text('0'), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('key_id')
    )
    op.create_table('workers',
    sa.Column('id', sa.String(length=200), nullable=False),
    sa.Column('heartbeat_at', sa.DateTime(), nullable=False),
    sa.Column('hot', sa.JSON(), nullable=False),
    sa.Column('warm', sa.JSON(), nullable=False),
    sa.Column('capacity', sa.Integer(), nullable=False),
    sa.PrimaryKeyConstraint('id')
    )
    op.create_table('adapters',
    sa.Column('id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=True, nullable=False),
    sa.Column('name', sa.String(length=200), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=True),
    sa.Column('tenant_key', sa.String(length=40), nullable=False),
    sa.Column('source', sa.Text(), nullable=False),
    sa.Column('revision', sa.String(length=200), nullable=True),
    sa.Column('base_model', sa.Text(), nullable=True),
    sa.Column('rank', sa.Integer(), nullable=True),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id'),
    sa.UniqueConstraint('tenant_key', 'name', name='uq_adapters_tenant_name')
    )
    op.create_table('batches',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('completion_window', sa.String(length=10), nullable=False),
    sa.Column('total', sa.Integer(), nullable=False),
    sa.Column('completed', sa.Integer(), nullable=False),
    sa.Column('failed', sa.Integer(), nullable=False),
    sa.Column('metadata', sa.JSON(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('expires_at', sa.DateTime(), nullable=True),
    sa.Column('in_progress_at', sa.DateTime(), nullable=True),
    sa.Column('finalizing_at', sa.DateTime(), nullable=True),
    sa.Column('completed_at', sa.DateTime(), nullable=True),
    sa.Column('failed_at', sa.DateTime(), nullable=True),
    sa.Column('expired_at', sa.DateTime(), nullable=True),
    sa.Column('cancelling_at', sa.DateTime(), nullable=True),
    sa.Column('cancelled_at', sa.DateTime(), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_batches_tenant_id'), ['tenant_id'], unique=False)

    op.create_table('jobs',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('adapter_id', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('adapter_name', sa.String(length=200), nullable=True),
    sa.Column('prompt', sa.Text(), nullable=True),
    sa.Column('messages', sa.JSON(), nullable=True),
    sa.Column('sampling', sa.JSON(), nullable=False),
    sa.Column('priority', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('attempts', sa.Integer(), nullable=False),
    sa.Column('max_attempts', sa.Integer(), nullable=False),
    sa.Column('enqueued_at', sa.DateTime(), nullable=False),
    sa.Column('not_before', sa.DateTime(), nullable=True),
    sa.Column('deadline', sa.DateTime(), nullable=True),
    sa.Column('worker_id', sa.String(length=200), nullable=True),
    sa.Column('lease_token', sa.String(length=40), nullable=True),
    sa.Column('lease_expires_at', sa.DateTime(), nullable=True),
    sa.Column('cancel_requested', sa.Boolean(), nullable=False),
    sa.Column('result_text', sa.Text(), nullable=True),
    sa.Column('result_token_ids', sa.JSON(), nullable=True),
    sa.Column('finish_reason', sa.String(length=20), nullable=True),
    sa.Column('prompt_tokens', sa.Integer(), nullable=True),
    sa.Column('completion_tokens', sa.Integer(), nullable=True),
    sa.Column('timings', sa.JSON(), nullable=True),
    sa.Column('error', sa.Text(), nullable=True),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('started_at', sa.DateTime(), nullable=True),
    sa.Column('finished_at', sa.DateTime(), nullable=True),
    sa.Column('batch_id', sa.String(length=40), nullable=True),
    sa.Column('seq', sa.Integer(), nullable=True),
    sa.Column('custom_id', sa.String(length=200), nullable=True),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='CASCADE'),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.create_index('ix_jobs_batch', ['batch_id', 'seq'], unique=False, postgresql_where=sa.text('batch_id IS NOT NULL'), sqlite_where=sa.text('batch_id IS NOT NULL'))
        batch_op.create_index('ix_jobs_deadline', ['deadline'], unique=False, postgresql_where=sa.text('deadline IS NOT NULL'), sqlite_where=sa.text('deadline IS NOT NULL'))
        batch_op.create_index('ix_jobs_queued_group', ['tenant_id', 'adapter_id', 'priority', 'enqueued_at'], unique=False, postgresql_where=sa.text("status = 'queued'"), sqlite_where=sa.text("status = 'queued'"))
        batch_op.create_index('ix_jobs_running_lease', ['lease_expires_at'], unique=False, postgresql_where=sa.text("status = 'running'"), sqlite_where=sa.text("status = 'running'"))
        batch_op.create_index('ix_jobs_tenant_created', ['tenant_id', 'created_at'], unique=False)
        batch_op.create_index('uq_jobs_tenant_idempotency', ['tenant_id', 'idempotency_key'], unique=True, postgresql_where=sa.text('idempotency_key IS NOT NULL'), sqlite_where=sa.text('idempotency_key IS NOT NULL'))



def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index('uq_jobs_tenant_idempotency', postgresql_where=sa.text('idempotency_key IS NOT NULL'), sqlite_where=sa.text('idempotency_key IS NOT NULL'))
        batch_op.drop_index('ix_jobs_tenant_created')
        batch_op.drop_index('ix_jobs_running_lease', postgresql_where=sa.text("status = 'running'"), sqlite_where=sa.text("status = 'running'"))
        batch_op.drop_index('ix_jobs_queued_group', postgresql_where=sa.text("status = 'queued'"), sqlite_where=sa.text("status = 'queued'"))
        batch_op.drop_index('ix_jobs_deadline', postgresql_where=sa.text('deadline IS NOT NULL'), sqlite_where=sa.text('deadline IS NOT NULL'))
        batch_op.drop_index('ix_jobs_batch', postgresql_where=sa.text('batch_id IS NOT NULL'), sqlite_where=sa.text('batch_id IS NOT NULL'))

    op.drop_table('jobs')
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_batches_tenant_id'))

    op.drop_table('batches')
    op.drop_table('adapters')
    op.drop_table('workers')
    op.drop_table('tenants')
    with op.batch_alter_table('queue_groups', schema=None) as batch_op:
        batch_op.drop_index('ix_queue_groups_tenant', postgresql_where=sa.text('queued_count > 0'), sqlite_where=sa.text('queued_count > 0'))
        batch_op.drop_index('ix_queue_groups_oldest', postgresql_where=sa.text('queued_count > 0'), sqlite_where=sa.text('queued_count > 0'))
        batch_op.drop_index('ix_queue_groups_adapter', postgresql_where=sa.text('queued_count > 0'), sqlite_where=sa.text('queued_count > 0'))

    op.drop_table('queue_groups')

"""OpenAI Files and Batches: files (+ file_chunks holding their bytes), the lines a batch
refused at creation (batch_rejects), and the Batch object's file ids, endpoint and
idempotency key on batches.

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-04 09:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None

def batch_columns() -> list[sa.Column]:
    return [
    sa.Column('endpoint', sa.String(length=40), nullable=True),
    sa.Column('input_file_id', sa.String(length=40), nullable=True),
    sa.Column('output_file_id', sa.String(length=40), nullable=True),
    sa.Column('error_file_id', sa.String(length=40), nullable=True),
    sa.Column('model', sa.String(length=200), nullable=True),
    sa.Column('rejected', sa.Integer(), server_default=sa.text('0'), nullable=False),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    ]


KEY_WHERE = sa.text('idempotency_key IS NOT NULL')


def upgrade() -> None:
    with op.batch_alter_table('batches', schema=None) as batch_op:
        for column in batch_columns():
            batch_op.add_column(column)
        batch_op.create_index('uq_batches_tenant_idempotency', ['tenant_id', 'idempotency_key'],
                              unique=True, postgresql_where=KEY_WHERE, sqlite_where=KEY_WHERE)
        batch_op.create_index('ix_batches_tenant_created', ['tenant_id', 'created_at', 'id'],
                              unique=False)
    op.create_table('batch_rejects',
    sa.Column('batch_id', sa.String(length=40), nullable=False),
    sa.Column('line', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('custom_id', sa.Text(), nullable=True),
    sa.Column('code', sa.String(length=64), nullable=False),
    sa.Column('param', sa.Text(), nullable=True),
    sa.Column('message', sa.Text(), nullable=False),
    sa.ForeignKeyConstraint(['batch_id'], ['batches.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('batch_id', 'line')
    )
    op.create_table('files',
    sa.Column('id', sa.String(length=40), nullable=False),
    sa.Column('tenant_id', sa.String(length=40), nullable=False),
    sa.Column('purpose', sa.String(length=20), nullable=False),
    sa.Column('filename', sa.String(length=255), nullable=False),
    sa.Column('bytes', sa.BigInteger(), nullable=False),
    sa.Column('lines', sa.Integer(), nullable=False),
    sa.Column('status', sa.String(length=20), nullable=False),
    sa.Column('created_at', sa.DateTime(), nullable=False),
    sa.Column('batch_id', sa.String(length=40), nullable=True),
    sa.Column('idempotency_key', sa.String(length=200), nullable=True),
    sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('id')
    )
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.create_index('ix_files_tenant_created', ['tenant_id', 'created_at', 'id'],
                              unique=False)
        batch_op.create_index('uq_files_tenant_idempotency', ['tenant_id', 'idempotency_key'],
                              unique=True, postgresql_where=KEY_WHERE, sqlite_where=KEY_WHERE)
    op.create_table('file_chunks',
    sa.Column('file_id', sa.String(length=40), nullable=False),
    sa.Column('seq', sa.Integer(), autoincrement=False, nullable=False),
    sa.Column('data', sa.LargeBinary(), nullable=False),
    sa.ForeignKeyConstraint(['file_id'], ['files.id'], ondelete='CASCADE'),
    sa.PrimaryKeyConstraint('file_id', 'seq')
    )


def downgrade() -> None:
    op.drop_table('file_chunks')
    with op.batch_alter_table('files', schema=None) as batch_op:
        batch_op.drop_index('uq_files_tenant_idempotency')
        batch_op.drop_index('ix_files_tenant_created')
    op.drop_table('files')
    op.drop_table('batch_rejects')
    with op.batch_alter_table('batches', schema=None) as batch_op:
        batch_op.drop_index('ix_batches_tenant_created')
        batch_op.drop_index('uq_batches_tenant_idempotency')
        for column in reversed(batch_columns()):
            batch_op.drop_column(column.name)

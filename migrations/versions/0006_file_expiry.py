"""files.expires_at: a file the tenant asked to expire (OpenAI's ``expires_after`` on upload,
``output_expires_after`` on a batch for its output and error files) is deleted by the
maintenance pass once that time has passed; batches.output_expires_seconds keeps what the
batch asked for until its files are built.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-07 09:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0006'
down_revision = '0005'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column('files', sa.Column('expires_at', sa.DateTime(), nullable=True))
    op.create_index('ix_files_expires', 'files', ['expires_at'],
                    postgresql_where=sa.text('expires_at IS NOT NULL'),
                    sqlite_where=sa.text('expires_at IS NOT NULL'))
    op.add_column('batches', sa.Column('output_expires_seconds', sa.Integer(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('output_expires_seconds')
    op.drop_index('ix_files_expires', table_name='files')
    with op.batch_alter_table('files') as batch:
        batch.drop_column('expires_at')

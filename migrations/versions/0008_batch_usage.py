"""batches.input_tokens / output_tokens: the token usage of a batch's succeeded requests,
summed once when it finalizes (OpenAI's Batch.usage; null for batches finished before).

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-07 14:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0008'
down_revision = '0007'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable columns without a default: a catalog change on PostgreSQL, no table rewrite
    op.add_column('batches', sa.Column('input_tokens', sa.BigInteger(), nullable=True))
    op.add_column('batches', sa.Column('output_tokens', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('output_tokens')
        batch.drop_column('input_tokens')

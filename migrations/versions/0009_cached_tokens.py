"""jobs.cached_tokens / batches.cached_tokens: the prompt tokens a result's engine served
from its prefix cache (OpenAI's prompt_tokens_details.cached_tokens), and their sum over a
batch's succeeded requests when it finalizes (null for results recorded before).

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 16:00:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0009'
down_revision = '0008'
branch_labels = None
depends_on = None


def upgrade() -> None:
    # nullable columns without a default: a catalog change on PostgreSQL, no table rewrite
    op.add_column('jobs', sa.Column('cached_tokens', sa.Integer(), nullable=True))
    op.add_column('batches', sa.Column('cached_tokens', sa.BigInteger(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('batches') as batch:
        batch.drop_column('cached_tokens')
    with op.batch_alter_table('jobs') as batch:
        batch.drop_column('cached_tokens')

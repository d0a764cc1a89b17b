"""jobs.result_logprobs: the per-token logprobs of a result, for jobs that asked for them.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-05 00:10:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('result_logprobs', sa.JSON(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_column('result_logprobs')

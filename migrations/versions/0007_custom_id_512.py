"""jobs.custom_id holds 512 characters, as batch lines may give (it held 200: a line's
custom_id of 201-512 characters passed validation and failed the whole batch create on
PostgreSQL with a 500; SQLite ignores the length).

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-07 11:30:00
"""
from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def _resize(old: int, new: int) -> None:
    # PostgreSQL: a catalog change, no table rewrite; SQLite (batch mode, as 0002): the jobs
    # table is copied once, its indexes rebuilt
    with op.batch_alter_table('jobs') as batch:
        batch.alter_column('custom_id', type_=sa.String(new), existing_type=sa.String(old),
                           existing_nullable=True)


def upgrade() -> None:
    _resize(200, 512)


def downgrade() -> None:
    _resize(512, 200)

"""maintenance_runs: when the lease reaper (and other periodic tasks) last finished a pass,
so that /readyz can tell a reaper that stopped running; the reaper's first run is recorded
as now.

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-05 01:00:00
"""
from __future__ import annotations

from datetime import datetime, timezone

import sqlalchemy as sa
from alembic import op

revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    table = op.create_table(
        'maintenance_runs',
        sa.Column('name', sa.String(length=40), nullable=False),
        sa.Column('last_run_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('name'))
    now = datetime.now(timezone.utc).replace(tzinfo=None)  # naive UTC, as every timestamp
    op.bulk_insert(table, [{'name': 'lease_reaper', 'last_run_at': now}])


def downgrade() -> None:
    op.drop_table('maintenance_runs')

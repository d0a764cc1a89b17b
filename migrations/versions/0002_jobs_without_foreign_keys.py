"""jobs without foreign keys to tenants and batches: their per-row checks were about half of
a bulk enqueue's server time (see docs/BENCHMARKS.md); the gateway checks both on submit.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-29 05:40:00
"""
from __future__ import annotations

from alembic import op

revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

# SQLite's foreign keys are unnamed: batch mode names the reflected ones by this convention.
SQLITE_NAMES = {"fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s"}
FOREIGN_KEYS = [  # (PostgreSQL name, SQLite name, column, referred table)
    ("jobs_tenant_id_fkey", "fk_jobs_tenant_id_tenants", "tenant_id", "tenants"),
    ("jobs_batch_id_fkey", "fk_jobs_batch_id_batches", "batch_id", "batches"),
]


def upgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("jobs", naming_convention=SQLITE_NAMES) as batch_op:
            for _, name, _, _ in FOREIGN_KEYS:
                batch_op.drop_constraint(name, type_="foreignkey")
        return
    for name, _, _, _ in FOREIGN_KEYS:
        op.drop_constraint(name, "jobs", type_="foreignkey")


def downgrade() -> None:
    if op.get_bind().dialect.name == "sqlite":
        with op.batch_alter_table("jobs", naming_convention=SQLITE_NAMES) as batch_op:
            for _, name, column, table in FOREIGN_KEYS:
                batch_op.create_foreign_key(name, table, [column], ["id"], ondelete="CASCADE")
        return
    for name, _, column, table in FOREIGN_KEYS:
        op.create_foreign_key(name, "jobs", table, [column], ["id"], ondelete="CASCADE")

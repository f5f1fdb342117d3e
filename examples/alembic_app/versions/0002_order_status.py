"""Add orders.status, 'open' unless said otherwise.

Revision ID: 0002_order_status
Revises: 0001_orders
"""

import sqlalchemy as sa
from alembic import op

revision = "0002_order_status"
down_revision = "0001_orders"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # A server default, so existing rows and inserts that leave it out both get 'open'.
    op.add_column("orders", sa.Column("status", sa.Text, nullable=False, server_default="open"), schema="public")


def downgrade() -> None:
    op.drop_column("orders", "status", schema="public")

"""Create public.orders: the app's own table, each row belonging to a session of public.sessions.

Revision ID: 0001_orders
Revises:
"""

import sqlalchemy as sa
from alembic import op

revision = "0001_orders"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "orders",
        sa.Column("order_id", sa.BigInteger, sa.Identity(), primary_key=True),
        # public.sessions comes from the unified schema, applied to the template before Alembic runs.
        # ON DELETE CASCADE: a session removed by the manager takes its orders with it.
        sa.Column(
            "session_id",
            sa.Text,
            sa.ForeignKey("public.sessions.session_id", ondelete="CASCADE"),
            nullable=False,
        ),
        sa.Column("total_cents", sa.Integer, nullable=False),
        schema="public",
    )


def downgrade() -> None:
    op.drop_table("orders", schema="public")

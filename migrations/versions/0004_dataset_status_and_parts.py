"""datasets.status, num_parts, error: datasets uploaded in parts and validated in the background

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        # Every dataset stored before this was validated in its upload request: ready, one archive.
        batch_op.add_column(sa.Column('status', sa.String(length=20), nullable=False, server_default='ready'))
        batch_op.add_column(sa.Column('num_parts', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('error', sa.Text(), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table('datasets', schema=None) as batch_op:
        batch_op.drop_column('error')
        batch_op.drop_column('num_parts')
        batch_op.drop_column('status')

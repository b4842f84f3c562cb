"""classifiers.artifact_key: where the classifier's (write-once) artifact is stored

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0003'
down_revision = '0002'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('classifiers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('artifact_key', sa.String(length=200), nullable=True))
    # Artifacts stored before versioned keys sit at classifiers/<id>.
    op.execute("UPDATE classifiers SET artifact_key = 'classifiers/' || id WHERE artifact_key IS NULL")
    with op.batch_alter_table('classifiers', schema=None) as batch_op:
        batch_op.alter_column('artifact_key', existing_type=sa.String(length=200), nullable=False)


def downgrade() -> None:
    with op.batch_alter_table('classifiers', schema=None) as batch_op:
        batch_op.drop_column('artifact_key')

"""classifier_aliases: a tenant's names for its classifiers, moved atomically

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'classifier_aliases',
        sa.Column('tenant_id', sa.String(length=40), nullable=False),
        sa.Column('name', sa.String(length=64), nullable=False),
        sa.Column('classifier_id', sa.String(length=40), nullable=False),
        sa.Column('updated_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['classifier_id'], ['classifiers.id']),
        sa.ForeignKeyConstraint(['tenant_id'], ['tenants.id'], ondelete='CASCADE'),
        sa.PrimaryKeyConstraint('tenant_id', 'name'),
    )
    with op.batch_alter_table('classifier_aliases', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_classifier_aliases_classifier_id'), ['classifier_id'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('classifier_aliases', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_classifier_aliases_classifier_id'))
    op.drop_table('classifier_aliases')

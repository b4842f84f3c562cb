"""jobs.parent_job_id and jobs.labels: a job started from another, with labels the user gave

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op


revision = '0007'
down_revision = '0006'
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('parent_job_id', sa.String(length=40), nullable=True))
        batch_op.add_column(sa.Column('labels', sa.JSON(), nullable=True))
        batch_op.create_foreign_key('fk_jobs_parent_job_id_jobs', 'jobs', ['parent_job_id'], ['id'],
                                    ondelete='SET NULL')


def downgrade() -> None:
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_constraint('fk_jobs_parent_job_id_jobs', type_='foreignkey')
        batch_op.drop_column('labels')
        batch_op.drop_column('parent_job_id')

"""Operator commands: `python -m app.cli migrate`, `python -m app.cli create-key --tenant NAME`."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
ROOT = Path(__file__).resolve().parent.parent


def run_migrations(database_url: str, revision: str = "head") -> None:
    """`alembic upgrade` against `database_url`, with the repository's alembic.ini and migrations/."""
    from alembic import command
    from alembic.config import Config

    config = Config(str(ROOT / "alembic.ini"))
    config.set_main_option("script_location", str(ROOT / "migrations"))
    config.attributes["url"] = database_url
    config.attributes["configure_logging"] = False  # keep the caller's (JSON) logging
    command.upgrade(config, revision)


@app.command()
def migrate(revision: str = typer.Option("head", help="Alembic revision to upgrade to")) -> None:
    """Create or upgrade the database schema (DATABASE_URL, default SQLite under COFT_DATA_DIR)."""
    from app.core.settings import get_settings

    settings = get_settings()
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    run_migrations(settings.database_url, revision)
    typer.echo(f"database at {revision}")


@app.command("create-key")
def create_key_command(tenant: str = typer.Option(..., "--tenant", help="tenant name (created if new)")) -> None:
    """Create an API key for TENANT and print it. It is stored hashed: this is the only time it is shown."""
    from app.core.auth import create_key
    from app.core.db import session_scope
    from app.core.settings import get_settings

    with session_scope(get_settings().database_url) as session:
        key = create_key(session, tenant)
    typer.echo(key)


if __name__ == "__main__":
    app()

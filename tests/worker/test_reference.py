"""The reference pages made from the code (worker/reference.py) are the committed ones: a new option or setting
that is not in docs/ fails here until `python -m worker.reference` is run."""
import pytest

from worker import reference


@pytest.mark.parametrize("name", sorted(reference.PAGES))
def test_a_committed_reference_page_is_what_the_code_makes(name):
    page = reference.DOCS / name
    assert page.is_file() and page.read_text() == reference.PAGES[name](), (
        f"docs/{name} is stale: run python -m worker.reference and commit it")


def test_the_pages_name_every_command_and_setting():
    from service.settings import Settings
    from worker.cli import build_parser

    cli, settings = reference.cli_markdown(), reference.settings_markdown()
    commands = next(a for a in build_parser()._actions if hasattr(a, "choices") and a.choices)
    assert all(f"## isl {name}\n" in cli for name in commands.choices)
    assert all(f"`ISL_{name.upper()}`" in settings for name in Settings.model_fields)
    assert "`ISL_LEASE_S` | `30` |" in settings and "*(workers)*" in settings.split("`ISL_LEASE_S`")[1].split("\n")[0]

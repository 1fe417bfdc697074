"""README.md's topic table is the contract users read: it must match bus/topics.py."""
from pathlib import Path

from livepipe.bus.topics import TOPICS

README = (Path(__file__).resolve().parent.parent / "README.md").read_text()


def test_readme_topic_table_names_every_topic_kind_and_field():
    table = {line.split("|")[1].strip(" `"): line for line in README.splitlines()
             if line.startswith("| `") and line.split("|")[2].strip() in ("audio", "video", "control", "events")}
    assert set(table) == set(TOPICS), "README topic table and bus/topics.py differ"
    for name, topic in TOPICS.items():
        row = table[name]
        assert f"| {topic.lane} |" in row
        for kind_name, kind in topic.kinds.items():
            assert f"`{kind_name}`" in row, (name, kind_name)
            for field in [*kind.required, *kind.optional]:
                assert field in row, (name, kind_name, field)


def test_readme_gives_the_two_fresh_machine_commands_and_ci_runs_the_test_one():
    assert "launch/install.sh && livepipe demo" in README
    test_cmd = "launch/install.sh --test && python3 -m pytest"
    assert test_cmd in README
    ci = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert test_cmd in ci


def test_readme_configuration_table_lists_every_gemini_bridge_flag():
    from livepipe.services.processes.gemini_bridge.settings import build_parser
    section = README.split("\n## Configuration", 1)[1].split("\n## ", 1)[0]
    table = "\n".join(line for line in section.splitlines() if line.startswith("| `"))
    flags = [o for a in build_parser()._actions for o in a.option_strings if o.startswith("--") and o != "--help"]
    missing = [f for f in flags if f"`{f}`" not in table]
    assert flags and not missing, f"README's configuration table lacks {missing}"

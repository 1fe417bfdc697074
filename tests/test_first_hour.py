"""What a new user meets in their first hour (issue 11), each as the user would meet it:
the README's service snippet run as printed, `livepipe transcript`, `livepipe top` in a real
terminal, replay into a running pipeline, and the smaller conveniences (say, ports, --version)."""
from __future__ import annotations

import re
import signal
import subprocess
import sys
from pathlib import Path

from livepipe.bus.client import BusClient
from tests.conftest import ROOT

README = (ROOT / "README.md").read_text()


def readme_block(section: str) -> str:
    """The first ```python block after the heading `section`."""
    rest = README[README.index(section):]
    m = re.search(r"```python\n(.*?)```", rest, re.S)
    assert m, f"no python block under {section}"
    return m.group(1)


# ------------------------------------------------------------ point 2: "Writing a service"
def test_readme_service_snippet_runs_serves_its_handler_and_exits_0_on_sigterm(bus_env, bus_cfg, tmp_path):
    script = tmp_path / "my_service.py"
    script.write_text(readme_block("### Writing a service"))
    proc = subprocess.Popen([sys.executable, str(script)], env=bus_env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        with BusClient("user", bus_cfg, ["text.in"]) as user:
            user.wait_ready()
            hello = user.wait_for("text.in", "text", timeout=15)   # its main ran
            assert hello["text"] == "hello" and hello["src"] == "my-service"
            user.wait_subscriber("transcript", 10)   # still serving after its main returned
            user.publish("transcript", "transcript", role="user", text="what do you see", turn=1, final=True)
            assert proc.stdout.readline() == "user what do you see\n"
            assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=5)
        assert proc.returncode == 0, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()

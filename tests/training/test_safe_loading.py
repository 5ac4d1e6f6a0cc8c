"""Safe loading: no network at import, no pickle without consent, no shell built from input, no remote code by default."""

import ast
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest
import torch

import emo_calibrate
from emo_calibrate.losses.cost_embedding import load_cost_embedding


PACKAGE = pathlib.Path(emo_calibrate.__file__).parent
SOURCES = sorted(PACKAGE.rglob("*.py"))


def test_importing_every_module_opens_no_connection():
    script = textwrap.dedent(
        """
        import pkgutil, socket, sys
        attempts = []
        def refuse(*args, **kwargs):
            attempts.append(args)
            raise OSError("network access at import time")
        socket.socket.connect = refuse
        socket.socket.connect_ex = refuse
        socket.create_connection = refuse
        socket.getaddrinfo = refuse
        import emo_calibrate
        names = [m.name for m in pkgutil.walk_packages(emo_calibrate.__path__, "emo_calibrate.")]
        for name in names:
            __import__(name)
        for name in emo_calibrate.__all__:
            getattr(emo_calibrate, name)
        print(len(names), "modules", len(attempts), "attempts")
        sys.exit(1 if attempts else 0)
        """
    )
    # Offline mode off on purpose: a module that tried to reach the Hub would now really try, and be caught.
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env["PYTHONPATH"] = str(PACKAGE.parent)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr[-3000:]
    assert " 0 attempts" in result.stdout


def _calls(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(PACKAGE)))
def test_no_shell_no_pickle_no_remote_code(path):
    tree = ast.parse(path.read_text(), str(path))
    for call, name in _calls(tree):
        keywords = {k.arg: k.value for k in call.keywords}
        where = f"{path.name}:{call.lineno}"
        assert name not in ("os.system", "os.popen", "eval", "exec", "pickle.load", "pickle.loads"), where
        shell = keywords.get("shell")
        assert not (isinstance(shell, ast.Constant) and shell.value), f"shell=True at {where}"
        if name.endswith("torch.load"):
            weights_only = keywords.get("weights_only")
            assert isinstance(weights_only, ast.Constant) and weights_only.value is True, f"torch.load at {where}"
        remote = keywords.get("trust_remote_code")
        assert not (isinstance(remote, ast.Constant) and remote.value), f"trust_remote_code=True at {where}"


def test_cost_embedding_never_reads_pickle(tmp_path):
    torch.save({"lm_head.weight": torch.randn(8, 4)}, tmp_path / "head.bin")
    with pytest.raises(ValueError, match="not a .safetensors file"):
        load_cost_embedding(tmp_path / "head.bin", vocab_size=8)
    with pytest.raises(ValueError, match="Pickle checkpoints \\(.bin\\) are not read"):
        load_cost_embedding(tmp_path, vocab_size=8)

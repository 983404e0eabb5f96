"""-t/--threads on every model command: the physical-core default, and the count reaching torch and the kernels."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llmcli import catalog
from llmcli.cli import COMMANDS, app
from llmcli.core import kernels
from llmcli.core.threads import physical_cores, serial_torch_ops
from llmcli.errors import UsageError
from tests.tiny import make_tiny

runner = CliRunner()


def fake_sys(root: Path, topology: dict[int, tuple[int, int]]) -> Path:
    """A /sys/devices/system/cpu tree: cpu -> (physical_package_id, core_id)."""
    for cpu, (package, core) in topology.items():
        folder = root / f"cpu{cpu}" / "topology"
        folder.mkdir(parents=True)
        (folder / "physical_package_id").write_text(f"{package}\n")
        (folder / "core_id").write_text(f"{core}\n")
    return root


def test_physical_cores_counts_package_core_pairs_of_the_affinity(tmp_path):
    # two packages, two cores each, two hyper-threads per core: 8 logical CPUs, 4 cores
    tree = fake_sys(tmp_path, {0: (0, 0), 1: (0, 1), 2: (1, 0), 3: (1, 1), 4: (0, 0), 5: (0, 1), 6: (1, 0), 7: (1, 1)})
    assert physical_cores(tree, set(range(8))) == 4
    assert physical_cores(tree, {0, 4}) == 1  # both threads of one core
    assert physical_cores(tree, {0, 2}) == 2  # core 0 of each package: the same core_id, different packages
    assert physical_cores(tree, {1, 3, 5}) == 2


def test_physical_cores_without_topology_counts_the_cpus(tmp_path):
    assert physical_cores(tmp_path, {0, 1, 2}) == 3


def test_physical_cores_of_this_machine_is_within_the_affinity():
    assert 1 <= physical_cores() <= len(os.sched_getaffinity(0))


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)
    kernels.set_threads(0)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    return make_tiny("llama", tmp_path_factory.mktemp("llama"))


@pytest.mark.parametrize("command", [["encode", "--pool", "mean"], ["attend"], ["generate", "-n", "2"]])
def test_threads_reach_torch_and_the_kernels(command, llama_dir, restore_threads):
    torch.set_num_threads(2)
    result = runner.invoke(app, [*command, "-m", str(llama_dir), "-t", "1"], input=json.dumps({"ids": [5, 6, 7]}) + "\n")
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1
    loaded = kernels.load_kernels(catalog.cache_root() / "kernels")  # the ones the command loaded
    if loaded is not None:
        assert loaded.threads() == 1
        seen = []  # OpenMP counts threads per calling thread: the explicit count holds in any thread
        worker = threading.Thread(target=lambda: seen.append(loaded.threads()))
        worker.start()
        worker.join()
        assert seen == [1]


def test_threads_default_is_the_physical_cores(llama_dir, restore_threads, monkeypatch):
    monkeypatch.setattr("llmcli.core.threads.physical_cores", lambda: 1)
    torch.set_num_threads(2)
    result = runner.invoke(app, ["attend", "-m", str(llama_dir)], input=json.dumps({"ids": [5, 6]}) + "\n")
    assert result.exit_code == 0, result.output
    assert torch.get_num_threads() == 1


def test_threads_below_one_is_a_usage_error(llama_dir):
    result = runner.invoke(app, ["encode", "-m", str(llama_dir), "-t", "0"], input="")
    assert isinstance(result.exception, UsageError) and "--threads 0" in result.exception.message


def test_every_model_command_has_threads():
    """Every command that runs a model takes -t/--threads; tokenize, decode, pull and models do not need it."""
    for name in sorted(set(COMMANDS) - {"tokenize", "decode", "pull", "models"}):
        result = runner.invoke(app, [name, "--help"])
        assert "--threads" in result.stdout and "-t" in result.stdout, name



@pytest.mark.parametrize("explicit", [0, 3])
def test_serial_torch_ops_keeps_the_kernels_count(explicit, restore_threads):
    """Inside, torch runs on one thread while the kernels keep the count they had (torch's, when
    they follow OpenMP's); both come back after, also when the block raises."""
    loaded = kernels.load_kernels(catalog.cache_root() / "kernels")
    if loaded is None:
        pytest.fail("the kernels did not build: this check needs them")
    torch.set_num_threads(2)
    kernels.set_threads(explicit)
    with pytest.raises(RuntimeError), serial_torch_ops():
        assert torch.get_num_threads() == 1
        assert loaded.threads() == (explicit or 2)
        raise RuntimeError("inside")
    assert torch.get_num_threads() == 2
    assert kernels.explicit_threads() == explicit
    assert loaded.threads() == (explicit or 2)

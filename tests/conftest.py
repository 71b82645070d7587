import os

import pytest
import torch

# Tests share 2 cores with whatever else runs; TRCE_TEST_THREADS=1 keeps them polite. Under pytest-xdist
# (`-n 2`, as CI runs) each worker takes its share of the cores, so that workers never stall each other.
if os.environ.get("TRCE_TEST_THREADS"):
    torch.set_num_threads(int(os.environ["TRCE_TEST_THREADS"]))
elif os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """A tiny random SD-layout pipeline saved as a diffusers folder."""
    from trce.testing import tiny_pipeline_dir

    return tiny_pipeline_dir(tmp_path_factory.mktemp("tiny") / "pipe")


@pytest.fixture()
def tiny_pipe():
    from trce.testing import tiny_pipeline

    return tiny_pipeline()


@pytest.fixture()
def run_cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from trce.cli import main

    def run(*args):
        code = main([str(a) for a in args])
        out = capsys.readouterr()
        return code, out.out, out.err

    return run

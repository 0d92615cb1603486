"""`cornserve up --backend kubernetes` where it cannot run: a clear one-line error, not a traceback.
(What the backend does in a cluster needs an API server, which cannot run here: its decisions are
tested in test_pods.py, the containers it starts in test_pod_as_process.py.)"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

CLI = [sys.executable, "-c", "from flyte_cornserve.cli import main; main()"]


def cornserve(home: pathlib.Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {name: value for name, value in os.environ.items()  # nothing of a pod this might run in
           if not name.startswith("KUBERNETES_") and name not in ("POD_NAME", "POD_NAMESPACE", "CORNSERVE_EXECUTOR_IMAGE")}
    env |= {"CORNSERVE_HOME": str(home), "KUBECONFIG": str(home / "no-kubeconfig"),
            "CORNSERVE_REDIS_URL": "redis://127.0.0.1:1/0"}  # never reached: the backend fails first
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)


def test_the_kubernetes_backend_runs_in_the_foreground_only(tmp_path: pathlib.Path) -> None:
    done = cornserve(tmp_path, "up", "--backend", "kubernetes")
    assert done.returncode == 2 and "--backend kubernetes runs in the cluster: give --foreground" in done.stderr


def test_without_a_cluster_the_kubernetes_backend_says_so(tmp_path: pathlib.Path) -> None:
    done = cornserve(tmp_path, "up", "--foreground", "--backend", "kubernetes", "--executor-image", "flyte-cornserve")
    assert done.returncode == 1, done.stderr
    assert "Error: no Kubernetes cluster to run executors in (not in a pod, and no kubeconfig)" in done.stderr
    assert "Traceback" not in done.stderr


def test_without_an_image_or_its_own_pod_the_kubernetes_backend_says_so(tmp_path: pathlib.Path) -> None:
    (tmp_path / "no-kubeconfig").write_text(  # a cluster that is never called: the image is missing first
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:1'}}]\n"
        "contexts: [{name: c, context: {cluster: c, user: u, namespace: cornserve}}]\ncurrent-context: c\n"
        "users: [{name: u, user: {}}]\n")
    done = cornserve(tmp_path, "up", "--foreground", "--backend", "kubernetes")
    assert done.returncode == 1, done.stderr
    assert "the executors' image is unknown: give --executor-image, or set POD_NAME" in done.stderr

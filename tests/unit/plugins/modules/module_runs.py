# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""Running a module in a unit test: its result, check mode beside the real run, warnings."""

from __future__ import absolute_import, division, print_function
__metaclass__ = type

import json

import pytest

from ansible.module_utils.testing import patch_module_args


def run(module, capsys, **args):
    """The result a module's main() prints (it always exits)."""
    with patch_module_args(args):
        with pytest.raises(SystemExit):
            module.main()
    return json.loads(capsys.readouterr().out)


def both(module, capsys, **args):
    """(check-mode result, real result) of the same task."""
    predicted = run(module, capsys, _ansible_check_mode=True, **args)
    done = run(module, capsys, **args)
    return predicted, done


def warnings_of(result):
    """The warning texts of a result (ansible-core 2.19+ returns each as a summary dict)."""
    texts = []
    for warning in result.get("warnings") or []:
        if isinstance(warning, dict):
            warning = warning.get("event", warning).get("msg", "")
        texts.append(warning)
    return texts

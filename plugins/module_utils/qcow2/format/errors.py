# Copyright (c) 2026 vdisk.qcow2 developers
# GNU General Public License v3.0+ (see LICENSE or https://www.gnu.org/licenses/gpl-3.0.txt)
# SPDX-License-Identifier: GPL-3.0-or-later
"""The one exception type the engine raises for everything it refuses."""


class Qcow2Error(Exception):
    """A refusal or a defect, with a message a user can act on.

    `option` names the creation option or parameter at fault, `path` the file concerned.
    """

    def __init__(self, message, option=None, path=None):
        super(Qcow2Error, self).__init__(message)
        self.message = message
        self.option = option
        self.path = path

    def __str__(self):
        return self.message

"""Fallback for %pyproject_install where pyproject-rpm-macros is missing (rpmbuild on Debian).

Installs WHEEL below DESTDIR with the layout Fedora and RHEL use (posix_prefix: PREFIX/lib/pythonX.Y/
site-packages, PREFIX/bin), whatever the build host's default scheme is (Debian's puts /usr/local
first), and with /usr/bin/python3 in the scripts' #! line. Needs the `installer` module.
"""

import sys
import sysconfig

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile

destdir, prefix, wheel = sys.argv[1:4]
paths = sysconfig.get_paths("posix_prefix", vars={"base": prefix, "platbase": prefix})
scheme = {key: paths[key] for key in ("purelib", "platlib", "scripts", "data")}
scheme["headers"] = paths["include"]
destination = SchemeDictionaryDestination(scheme, interpreter="/usr/bin/python3", script_kind="posix",
                                          destdir=destdir)
with WheelFile.open(wheel) as source:
    install(source, destination, {"INSTALLER": b"rpm\n"})

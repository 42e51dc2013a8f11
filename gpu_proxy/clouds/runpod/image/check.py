"""Compare an image's versions with home's and word the answer: :func:`check_image`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

from gpu_proxy.clouds.runpod.image.engine import ENGINES, probe_with_engine
from gpu_proxy.clouds.runpod.image.labels import SOURCE_LABEL, built_with_checked_labels, versions_from_labels
from gpu_proxy.clouds.runpod.image.registry import RegistryError, read_labels
from gpu_proxy.versions import PACKAGES, home_versions, project_root, public_version, source_digest

SAME, DIFFERS, MISSING, UNKNOWN = "same", "differs", "missing", "not checked"
REBUILD = ("rebuild it with this machine's versions (`docker build -f cluster_image/Dockerfile "
           "$(python cluster_image/build_args.py) ...`), or leave image= unset: pods then start from RunPod's stock "
           "image and get your versions installed")


@dataclass(frozen=True)
class Row:
    name: str
    home: str
    image: str  # "" when the image has none or it is not known
    status: str


@dataclass
class ImageReport:
    """The answer of ``gpu-proxy image check``; ``exit_code``: 0 all match, 1 something differs, 3 not all checked."""

    image: str
    source: str  # how the image's versions were read ("" when they could not be)
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def names(self, status: str) -> list[str]:
        return [row.name for row in self.rows if row.status == status]

    @property
    def exit_code(self) -> int:
        if self.names(DIFFERS) or self.names(MISSING):
            return 1
        return 3 if self.names(UNKNOWN) or not self.rows else 0

    def text(self) -> str:
        lines = [f"{self.image}: " + (f"versions from {self.source}" if self.source else "its versions could not be read")]
        width = max([len(row.name) for row in self.rows] + [7])
        lines.append(f"  {'PACKAGE'.ljust(width)}  {'HOME'.ljust(18)}  {'IMAGE'.ljust(18)}  ")
        lines += [f"  {row.name.ljust(width)}  {row.home.ljust(18)}  {(row.image or '-').ljust(18)}  {row.status}"
                  for row in self.rows]
        wrong = self.names(DIFFERS) + self.names(MISSING)
        if wrong:
            lines.append(f"differs from home in {', '.join(wrong)}: Ray's wire protocol and unpickling the model need "
                         f"the same versions on both sides; {REBUILD}.")
        elif self.exit_code == 3:
            checked = self.names(SAME)
            lines.append(f"could not check {', '.join(self.names(UNKNOWN)) or 'anything'}"
                         + (f" (the rest match: {', '.join(checked)})." if checked else ": see the notes."))
        else:
            lines.append("matches home: pods started from it run what this machine runs.")
        return "\n".join(lines + [f"note: {note}" for note in self.notes])


def _compare(home: Mapping[str, str], image: Mapping[str, str] | None, stated_only: bool) -> list[Row]:
    """``stated_only``: the versions come from labels, so a name without a label is unknown, not missing."""
    rows = []
    for name in ("python", *PACKAGES):
        if name not in home:
            continue
        found = (image or {}).get(name, "")
        if image is None or (stated_only and not found):
            status = UNKNOWN
        elif not found:
            status = MISSING
        else:
            status = SAME if public_version(found) == public_version(home[name]) else DIFFERS
        rows.append(Row(name, home[name], found, status))
    return rows


def check_image(image: str, *, engines: Sequence[str] = ENGINES, registry: bool = True,
                home: Mapping[str, str] | None = None, home_source: str | None = None) -> ImageReport:
    """Are ``image``'s versions home's? Probes it with a local engine, else reads its labels from its registry.

    ``home``/``home_source`` default to this process's versions and, when it runs gpu-proxy from a source
    tree, that tree's digest (compared with the image's ``gpu-proxy.source`` label).
    """
    home = dict(home) if home is not None else home_versions()
    if home_source is None and (root := project_root()) is not None:
        home_source = source_digest(root)
    notes: list[str] = []
    found, tried = probe_with_engine(image, tuple(engines)) if engines else (None, ["no engine asked for"])
    labels: dict[str, str] | None = None
    versions, source = None, ""
    if found is not None:
        labels = found.labels
        if found.versions is not None:
            versions, source = found.versions, f"running Python inside the image with {found.engine}"
        else:
            notes.append(f"{found.engine} has the image but {found.problem}")
    else:
        notes += [f"not probed locally ({reason})" for reason in tried]
    if found is None and registry:
        try:
            labels = read_labels(image)
        except RegistryError as error:
            notes.append(f"labels not read from the registry: {error}")
    if versions is None and labels is not None:
        versions = versions_from_labels(labels)
        source = "its labels" + (f" (read by {found.engine})" if found is not None else " (read from its registry)")
        if not versions:
            versions = None
            notes.append("the image has no gpu-proxy version labels: it was not built from cluster_image/Dockerfile. "
                         "Pull it and check with docker/podman here, which runs Python inside it.")
        elif not built_with_checked_labels(labels):
            notes.append("built from an older cluster_image/Dockerfile: its labels were not checked against what it "
                         "installed.")
    report = ImageReport(image, source if versions is not None else "",
                         _compare(home, versions, stated_only=source.startswith("its labels")), notes)
    if home_source:  # home runs a source tree: is the image's gpu-proxy that code?
        stated = (labels or {}).get(SOURCE_LABEL, "")
        status = UNKNOWN if not stated else SAME if stated == home_source else DIFFERS
        report.rows.append(Row("gpu-proxy source", home_source, stated, status))
    return report

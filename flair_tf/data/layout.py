"""Finds the files of a FLAIR #1 / #2 tree, pairs them and assigns splits.

Released layout (spec flair1 §1.1, flair2 §1.1)::

    flair_aerial_train/<domain>/<zone>/img/IMG_<id>.tif
    flair_labels_train/<domain>/<zone>/msk/MSK_<id>.tif
    flair_sen_train/<domain>/<zone>/sen/SEN2_sp_<domain>-<zone>_{data.npy,masks.npy,products.txt}
    flair_1_aerial_test/... flair_1_labels_test/...          (FLAIR #1 test)
    flair_2_aerial_test/... flair_2_labels_test/... flair_2_sen_test/...   (FLAIR #2 test)
    flair-1_metadata_aerial.json | flair_aerial_metadata.json
    flair-2_centroids_sp_to_patch.json

The toy datasets (``flair_1_toy_dataset/flair_1_toy_aerial_train`` ...,
``flair_2_toy_dataset/flair_2_toy_{aerial,labels,sen}_{train,test}``) are found
too, whether `data_root` is the toy folder or its parent.

Images, masks and Sentinel super-areas are paired by patch id and zone, never by
sort order. Train and validation are split by whole domains (the eight official
validation domains by default); the test split comes from the test folders.
IGN's CSV lists (``image_path,mask_path``, no header) can replace the folder
scan for any split.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import posixpath
import re
from typing import Iterable, Sequence

from absl import logging

from flair_tf.data.readers import FlairDataError

TASKS = ("flair1", "flair2")
SPLITS = ("train", "val", "test")

# Spec flair1 §1.6: the main library's fixed validation domains (also the toy val CSV's).
OFFICIAL_VAL_DOMAINS: tuple[str, ...] = (
    "D004_2021", "D014_2020", "D029_2021", "D031_2019",
    "D058_2020", "D066_2021", "D067_2021", "D070_2020",
)
FLAIR1_TEST_DOMAINS: tuple[str, ...] = (
    "D012_2019", "D022_2021", "D026_2020", "D064_2021", "D068_2021",
    "D071_2020", "D075_2021", "D076_2019", "D083_2020", "D085_2019",
)
FLAIR2_TEST_DOMAINS: tuple[str, ...] = (
    "D015_2020", "D022_2021", "D026_2020", "D036_2020", "D061_2020",
    "D064_2021", "D068_2021", "D069_2020", "D071_2020", "D084_2021",
)

# Folder names per task and role: (released, toy). "trainval" holds train + val.
_FOLDERS = {
    "flair1": {
        ("aerial", "trainval"): ("flair_aerial_train", "flair_1_toy_aerial_train"),
        ("labels", "trainval"): ("flair_labels_train", "flair_1_toy_labels_train"),
        ("aerial", "test"): ("flair_1_aerial_test", "flair_1_toy_aerial_test"),
        ("labels", "test"): ("flair_1_labels_test", "flair_1_toy_labels_test"),
    },
    "flair2": {
        ("aerial", "trainval"): ("flair_aerial_train", "flair_2_toy_aerial_train"),
        ("labels", "trainval"): ("flair_labels_train", "flair_2_toy_labels_train"),
        ("sen", "trainval"): ("flair_sen_train", "flair_2_toy_sen_train"),
        ("aerial", "test"): ("flair_2_aerial_test", "flair_2_toy_aerial_test"),
        ("labels", "test"): ("flair_2_labels_test", "flair_2_toy_labels_test"),
        ("sen", "test"): ("flair_2_sen_test", "flair_2_toy_sen_test"),
    },
}
_TOY_DIRS = {"flair1": "flair_1_toy_dataset", "flair2": "flair_2_toy_dataset"}
METADATA_NAMES = {
    "flair1": ("flair-1_metadata_aerial.json", "flair_aerial_metadata.json",
               "flair_1_metadata_aerial.json", "flair-one_TOY_metadata.json"),
    "flair2": ("flair_aerial_metadata.json", "flair-2_metadata_aerial.json",
               "flair_2_metadata_aerial.json", "flair-1_metadata_aerial.json"),
}
CENTROIDS_NAMES = ("flair-2_centroids_sp_to_patch.json", "flair_2_centroids_sp_to_patch.json")

_IMG_RE = re.compile(r"^IMG_(\d+)\.tif$")
_MSK_RE = re.compile(r"^MSK_(\d+)\.tif$")
DOMAIN_RE = re.compile(r"^D\d{3}_\d{4}$")
ZONE_RE = re.compile(r"^Z\d+_[A-Z]{2}$")


@dataclasses.dataclass(frozen=True)
class SentinelFiles:
    """The three files of one zone's Sentinel-2 super-area."""

    data: str  # SEN2_sp_<domain>-<zone>_data.npy
    masks: str  # SEN2_sp_<domain>-<zone>_masks.npy
    products: str  # SEN2_sp_<domain>-<zone>_products.txt


@dataclasses.dataclass(frozen=True)
class PatchFiles:
    """The files of one aerial patch.

    Attributes:
      patch_id: the 6-digit id as written in the file name ("000717").
      domain: "D004_2021".
      zone: "Z8_NF".
      image: path of ``IMG_<id>.tif``.
      mask: path of ``MSK_<id>.tif``; None when the split has no labels.
      sentinel: the zone's super-area (FLAIR #2 only).
    """

    patch_id: str
    domain: str
    zone: str
    image: str
    mask: str | None
    sentinel: SentinelFiles | None = None

    @property
    def name(self) -> str:
        """"IMG_000717": the key of the metadata and centroid JSONs."""
        return f"IMG_{self.patch_id}"


@dataclasses.dataclass(frozen=True)
class FlairTree:
    """A discovered tree.

    Attributes:
      task: "flair1" or "flair2".
      root: the data root given to `discover`.
      splits: split name -> patches sorted by patch id.
      metadata_json: the aerial metadata JSON, None if absent.
      centroids_json: the Sentinel centroid JSON (FLAIR #2), None if absent.
    """

    task: str
    root: str
    splits: dict[str, list[PatchFiles]]
    metadata_json: str | None
    centroids_json: str | None


# --- file-system helpers: plain os for local paths, tf.io.gfile for gs:// ----------------

def _remote(path: str) -> bool:
    return "://" in path


def _join(*parts: str) -> str:
    if _remote(parts[0]):
        return "/".join(p.strip("/") if i else p.rstrip("/") for i, p in enumerate(parts))
    return os.path.join(*parts)


def _normpath(path: str) -> str:
    """Collapses ``..`` and ``.``; keeps the ``scheme://`` of remote paths intact."""
    if _remote(path):
        scheme, rest = path.split("://", 1)
        return f"{scheme}://{posixpath.normpath(rest)}"
    return os.path.normpath(path)


def _dirname(path: str) -> str:
    return posixpath.dirname(path) if _remote(path) else os.path.dirname(path)


def _isdir(path: str) -> bool:
    if _remote(path):
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        return tf.io.gfile.isdir(path)
    return os.path.isdir(path)


def _exists(path: str) -> bool:
    if _remote(path):
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        return tf.io.gfile.exists(path)
    return os.path.exists(path)


def _listdir(path: str) -> list[str]:
    if _remote(path):
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        return sorted(n.rstrip("/") for n in tf.io.gfile.listdir(path))
    return sorted(os.listdir(path))


def _read_text(path: str) -> str:
    if _remote(path):
        import tensorflow as tf  # pylint: disable=g-import-not-at-top

        with tf.io.gfile.GFile(path, "r") as f:
            return f.read()
    with open(path, newline="") as f:
        return f.read()


# --- discovery -----------------------------------------------------------------------------

def released_folder(task: str, role: str, group: str) -> str:
    """The released name of a folder.

    Args:
      task: "flair1" or "flair2".
      role: "aerial", "labels" or "sen" (FLAIR #2 only).
      group: "trainval" (the train folders, train + val) or "test".

    Example:
      >>> released_folder("flair2", "sen", "test")
      'flair_2_sen_test'
    """
    try:
        return _FOLDERS[task][(role, group)][0]
    except KeyError:
        raise ValueError(f"no {role!r} folder for task {task!r}, group {group!r}; roles are "
                         f"aerial, labels, sen (flair2) and groups trainval, test") from None


def _candidate_roots(data_root: str, task: str) -> list[str]:
    roots = [data_root]
    toy = _join(data_root, _TOY_DIRS[task])
    if _isdir(toy):
        roots.append(toy)
    return roots


def _find_folder(roots: Sequence[str], task: str, role: str, group: str) -> str | None:
    for root in roots:
        for name in _FOLDERS[task].get((role, group), ()):
            path = _join(root, name)
            if _isdir(path):
                return path
    return None


def _find_file(roots: Sequence[str], names: Iterable[str]) -> str | None:
    for root in roots:
        for name in names:
            path = _join(root, name)
            if _exists(path):
                return path
    return None


def _scan(folder: str, leaf: str, pattern: re.Pattern) -> dict[tuple[str, str, str], str]:
    """Maps (domain, zone, id) -> path for ``folder/<domain>/<zone>/<leaf>/<file>``."""
    found: dict[tuple[str, str, str], str] = {}
    by_id: dict[str, str] = {}
    for domain in _listdir(folder):
        ddir = _join(folder, domain)
        if not DOMAIN_RE.match(domain) or not _isdir(ddir):
            continue
        for zone in _listdir(ddir):
            zdir = _join(ddir, zone, leaf)
            if not _isdir(zdir):
                continue
            for fname in _listdir(zdir):
                m = pattern.match(fname)
                if not m:
                    continue
                path = _join(zdir, fname)
                pid = m.group(1)
                if pid in by_id:
                    raise FlairDataError(
                        f"{fname} appears twice: {by_id[pid]} and {path}; expected patch ids "
                        f"unique across the tree"
                    )
                by_id[pid] = path
                found[(domain, zone, pid)] = path
    return found


def _sentinel_files(sen_folder: str, domain: str, zone: str) -> SentinelFiles:
    base = _join(sen_folder, domain, zone, "sen", f"SEN2_sp_{domain}-{zone}")
    files = SentinelFiles(data=base + "_data.npy", masks=base + "_masks.npy",
                          products=base + "_products.txt")
    for path in dataclasses.astuple(files):
        if not _exists(path):
            raise FlairDataError(
                f"{path}: missing; expected the Sentinel-2 super-area of zone {domain}/{zone} "
                f"(data.npy, masks.npy, products.txt)"
            )
    return files


def _pair(
    images: dict[tuple[str, str, str], str],
    masks: dict[tuple[str, str, str], str] | None,
    require_labels: bool,
    sen_folder: str | None,
    task: str,
    labels_folder: str | None,
) -> list[PatchFiles]:
    if masks is not None:
        masks_by_id = {key[2]: (key, path) for key, path in masks.items()}
        orphans = sorted(set(masks) - set(images))
        if orphans:
            logging.warning("%d mask(s) without an image, ignored (first: %s)",
                            len(orphans), masks[orphans[0]])
    sentinel_cache: dict[tuple[str, str], SentinelFiles] = {}
    patches = []
    for key in sorted(images, key=lambda k: int(k[2])):
        domain, zone, pid = key
        mask = masks.get(key) if masks is not None else None
        if mask is None and require_labels:
            if masks is None:
                raise FlairDataError(
                    f"{images[key]}: no labels folder found for this split, expected "
                    f"{labels_folder}; pass require_labels=False to read images without masks"
                )
            elsewhere = masks_by_id.get(pid)
            hint = f" (a MSK_{pid}.tif exists in {elsewhere[0][0]}/{elsewhere[0][1]})" if elsewhere else ""
            raise FlairDataError(
                f"{images[key]}: no mask MSK_{pid}.tif in {domain}/{zone}/msk{hint}; expected one "
                f"per image (pass require_labels=False to read images without masks)"
            )
        sentinel = None
        if task == "flair2":
            if sen_folder is None:
                raise FlairDataError(
                    f"{images[key]}: no Sentinel-2 folder found for this split (expected "
                    f"flair_sen_train / flair_2_sen_test next to the aerial folder)"
                )
            if (domain, zone) not in sentinel_cache:
                sentinel_cache[(domain, zone)] = _sentinel_files(sen_folder, domain, zone)
            sentinel = sentinel_cache[(domain, zone)]
        patches.append(PatchFiles(pid, domain, zone, images[key], mask, sentinel))
    return patches


def _domain_zone_from_path(path: str, csv_path: str, lineno: int) -> tuple[str, str]:
    parts = path.replace("\\", "/").split("/")
    if len(parts) >= 4 and DOMAIN_RE.match(parts[-4]) and parts[-2] in ("img", "msk"):
        return parts[-4], parts[-3]
    raise FlairDataError(
        f"{csv_path} line {lineno}: {path!r} is not .../<domain>/<zone>/img/IMG_<id>.tif; "
        f"expected the released layout so that domain and zone are known"
    )


def read_csv_list(csv_path: str, task: str, require_labels: bool = True,
                  sen_folders: Sequence[str] = ()) -> list[PatchFiles]:
    """Reads one of IGN's CSV path lists (``image_path,mask_path``, no header).

    Relative paths are relative to the CSV's folder. A row with only an image
    path has no mask (an error unless ``require_labels=False``).

    Args:
      csv_path: the CSV file.
      task: "flair1" or "flair2".
      require_labels: raise on rows without a mask path.
      sen_folders: FLAIR #2 Sentinel folders to look the zones' super-areas up in.
    """
    base = _dirname(csv_path)
    patches = []
    seen: dict[str, int] = {}
    rows = csv.reader(io.StringIO(_read_text(csv_path)))
    for lineno, row in enumerate(rows, start=1):
        row = [c.strip() for c in row if c.strip()]
        if not row:
            continue
        paths = [c if (os.path.isabs(c) or _remote(c)) else _normpath(_join(base, c))
                 for c in row[:2]]
        image = paths[0]
        m = _IMG_RE.match(os.path.basename(image))
        if not m:
            raise FlairDataError(
                f"{csv_path} line {lineno}: first column {row[0]!r} is not an IMG_<id>.tif path; "
                f"expected 'image_path,mask_path' without a header"
            )
        pid = m.group(1)
        mask = paths[1] if len(paths) > 1 else None
        if mask is not None:
            mm = _MSK_RE.match(os.path.basename(mask))
            if not mm or mm.group(1) != pid:
                raise FlairDataError(
                    f"{csv_path} line {lineno}: mask {row[1]!r} does not match image "
                    f"IMG_{pid}.tif; expected MSK_{pid}.tif"
                )
        elif require_labels:
            raise FlairDataError(
                f"{csv_path} line {lineno}: no mask path for {row[0]!r}; expected "
                f"'image_path,mask_path' (or require_labels=False)"
            )
        if pid in seen:
            raise FlairDataError(
                f"{csv_path} line {lineno}: IMG_{pid}.tif already listed on line {seen[pid]}"
            )
        seen[pid] = lineno
        domain, zone = _domain_zone_from_path(image, csv_path, lineno)
        sentinel = None
        if task == "flair2":
            folders = [f for f in sen_folders if _isdir(_join(f, domain, zone))]
            if not folders:
                raise FlairDataError(
                    f"{csv_path} line {lineno}: no Sentinel-2 super-area for {domain}/{zone} in "
                    f"{list(sen_folders)}; expected <sen folder>/{domain}/{zone}/sen/"
                )
            sentinel = _sentinel_files(folders[0], domain, zone)
        patches.append(PatchFiles(pid, domain, zone, image, mask, sentinel))
    patches.sort(key=lambda p: int(p.patch_id))
    return patches


def discover(
    data_root: str,
    task: str,
    splits: Sequence[str] = SPLITS,
    val_domains: Sequence[str] | None = None,
    csv_lists: dict[str, str] | None = None,
    require_labels: bool = True,
) -> FlairTree:
    """Finds, pairs and splits the patches of a FLAIR tree.

    Args:
      data_root: folder holding the released folders (or the toy dataset).
      task: "flair1" or "flair2".
      splits: the splits to list, among "train", "val", "test".
      val_domains: domains of the train folders that form "val"; None means
        `OFFICIAL_VAL_DOMAINS`; an empty sequence means no validation split.
        A listed domain absent from the tree is logged as a warning.
      csv_lists: split -> IGN CSV list; such a split is read from the CSV instead
        of the folders (and no domain split is applied to it).
      require_labels: an image without its mask raises (otherwise its mask is
        None). Set False to list a test split whose labels are not available.

    Returns:
      A `FlairTree` whose splits hold the patches sorted by id.

    Raises:
      FlairDataError: missing folders, an image without its mask, duplicate ids,
        a zone without its Sentinel files (FLAIR #2).
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}. Received: task={task!r}")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown:
        raise ValueError(f"splits must be among {SPLITS}. Received: {list(splits)}")
    csv_lists = dict(csv_lists or {})
    user_val = val_domains is not None
    val_domains = tuple(OFFICIAL_VAL_DOMAINS if val_domains is None else val_domains)
    roots = _candidate_roots(data_root, task)
    sen_folders = [f for f in (_find_folder(roots, task, "sen", g) for g in ("trainval", "test")) if f]

    def from_folders(group: str) -> list[PatchFiles]:
        aerial = _find_folder(roots, task, "aerial", group)
        if aerial is None:
            raise FlairDataError(
                f"{data_root}: no {task} aerial folder for the {group} split; expected one of "
                f"{list(_FOLDERS[task][('aerial', group)])} (found {_safe_list(data_root)})"
            )
        labels = _find_folder(roots, task, "labels", group)
        sen = _find_folder(roots, task, "sen", group) if task == "flair2" else None
        images = _scan(aerial, "img", _IMG_RE)
        if not images:
            raise FlairDataError(
                f"{aerial}: no IMG_<id>.tif found; expected <domain>/<zone>/img/IMG_<id>.tif"
            )
        masks = _scan(labels, "msk", _MSK_RE) if labels else None
        expected_labels = _FOLDERS[task][("labels", group)][0]
        return _pair(images, masks, require_labels, sen, task, expected_labels)

    out: dict[str, list[PatchFiles]] = {}
    trainval: list[PatchFiles] | None = None
    for split in splits:
        if split in csv_lists:
            out[split] = read_csv_list(csv_lists[split], task, require_labels, sen_folders)
        elif split == "test":
            out[split] = from_folders("test")
        else:
            if trainval is None:
                trainval = from_folders("trainval")
                present = {p.domain for p in trainval}
                absent = [d for d in val_domains if d not in present]
                # A user's absent domain is likely a typo: warn. The official list is
                # only partly present in toy or synthetic trees: say so quietly, unless
                # none of it is there.
                if absent and (user_val or len(absent) == len(val_domains)):
                    logging.warning("validation domain(s) %s not in %s; the val split has "
                                    "%s", absent, data_root, sorted(set(val_domains) & present))
                elif absent:
                    logging.info("official validation domains absent from %s: %s",
                                 data_root, absent)
            is_val = split == "val"
            out[split] = [p for p in trainval if (p.domain in val_domains) == is_val]
    for split, patches in out.items():
        logging.info("%s %s: %d patches, %d domains", task, split, len(patches),
                     len({p.domain for p in patches}))
    metadata_json = _find_file(roots, METADATA_NAMES[task])
    centroids_json = _find_file(roots, CENTROIDS_NAMES) if task == "flair2" else None
    return FlairTree(task=task, root=data_root, splits=out, metadata_json=metadata_json,
                     centroids_json=centroids_json)


def _safe_list(path: str) -> list[str]:
    try:
        return _listdir(path)[:20]
    except OSError:
        return []

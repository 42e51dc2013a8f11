"""Checkpoint storage on any fsspec URL: pre-flight checks, atomic commits, background uploads.

    check_writable(url, storage_options)        fail early, in plain words, if `url` cannot be used
    BackgroundUploader                          upload + commit behind the caller, in order
    latest_committed(dir_url, storage_options)  newest complete checkpoint under a directory
    list_committed / committed_details / remove_committed / remove_orphans

Framework-free: the Lightning plugin lives in `gpu_proxy_lightning.checkpoint_io`.
"""
from gpu_proxy.storage.catalog import (committed_details, is_committed, latest_committed, list_committed,
                                       remove_committed, remove_orphans)
from gpu_proxy.storage.check import check_writable
from gpu_proxy.storage.commit import COMMITS_DIR, CommittedCheckpoint, commit_bytes, commit_file
from gpu_proxy.storage.errors import StorageError, UploadError
from gpu_proxy.storage.location import resolve
from gpu_proxy.storage.publish import STAGING_DIR
from gpu_proxy.storage.uploader import BackgroundUploader

__all__ = ["COMMITS_DIR", "STAGING_DIR", "BackgroundUploader", "CommittedCheckpoint", "StorageError",
           "UploadError", "check_writable", "commit_bytes", "committed_details", "commit_file", "is_committed", "latest_committed", "list_committed",
           "remove_committed", "remove_orphans", "resolve"]

"""Pseudonymized ids for published outputs: recipe ``[privacy] pseudonymize_ids`` (key from ``key_env``).

OAI participant ids are already de-identified by OAI, but users who publish derived data (shards, exports,
predictions keyed by sample id) may be asked to replace them. With ``pseudonymize_ids = true`` every patient id
in a published output becomes ``HMAC-SHA256(key, patient_id)`` as 16 hex digits, and the ids built on it keep
their structure with the patient part replaced::

    9027422                            -> 3f0c9a1be47d2c55
    9027422_00M_20041222_10312706_2    -> 3f0c9a1be47d2c55_00M_20041222_10312706_2        (volume_id)
    9027422_00M_20041222_10312706_2_17 -> 3f0c9a1be47d2c55_00M_20041222_10312706_2_17     (sample_id)

The same key gives the same ids on every run and machine (so shards, exports and predictions still join); another
key gives unrelated ids; without the key the mapping cannot be recomputed or reversed. The key is read from the
environment variable the recipe names, never stored; a missing or empty key is a :class:`RecipeError`.

Where it applies: the ``sample_id``, ``volume_id`` and ``patient_id`` columns of the shards, the shards'
``report.json`` (rejections), and hence the manifest and dataset card (which hold no ids but counts). The volume
store is the operator's working copy and keeps the real ids (its groups are named by them), as do the run
reports beside it, so problems can still be traced to their DICOM folders.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import os
from collections.abc import Iterable, Mapping

from kneeprep.errors import RecipeError

#: hex digits of the HMAC kept as the pseudonym (64 bits: no collision among millions of patients).
DIGITS = 16


@dataclasses.dataclass(frozen=True)
class Pseudonymizer:
    """Maps patient ids (and the ids built on them) to keyed hashes; the identity when ``key`` is None."""

    key: bytes | None = dataclasses.field(default=None, repr=False)

    @classmethod
    def from_recipe(cls, recipe, environ: Mapping[str, str] | None = None) -> Pseudonymizer:
        """The recipe's pseudonymizer: the identity when ``privacy.pseudonymize_ids`` is off; else keyed with
        the value of the environment variable ``privacy.key_env`` (a :class:`RecipeError` when unset or empty)."""
        p = recipe.privacy
        if not p.pseudonymize_ids:
            return cls(None)
        env = os.environ if environ is None else environ
        key = env.get(p.key_env, "")
        if not key:
            raise RecipeError(
                f"privacy.pseudonymize_ids is on but the key variable {p.key_env} is not set (or empty): "
                f"export {p.key_env}=<a secret> (keep it: the same key gives the same ids)"
            )
        return cls(key.encode())

    @property
    def enabled(self) -> bool:
        return self.key is not None

    @property
    def fingerprint(self) -> str:
        """A hash of the key (not of any id): outputs made with different keys get different input hashes."""
        if self.key is None:
            return ""
        return hmac.new(self.key, b"kneeprep key fingerprint", hashlib.sha256).hexdigest()[:DIGITS]

    def patient(self, patient_id: str) -> str:
        """>>> Pseudonymizer(b"k").patient("9027422") == Pseudonymizer(b"k").patient("9027422") != "9027422"
        True
        """
        if self.key is None:
            return patient_id
        return hmac.new(self.key, str(patient_id).encode(), hashlib.sha256).hexdigest()[:DIGITS]

    def prefixed(self, text: str, patient_id: str) -> str:
        """``text`` with its leading ``patient_id`` replaced (volume and sample ids); other text unchanged.

        >>> Pseudonymizer(b"k").prefixed("9027422_00M_20041222_10312706_2", "9027422").endswith("_00M_20041222_10312706_2")
        True
        """
        if self.key is None or not patient_id or not text.startswith(str(patient_id)):
            return text
        return self.patient(patient_id) + text[len(str(patient_id)) :]

    def text(self, text: str, patients: Iterable[str]) -> str:
        """Free text (a rejection message) with every occurrence of each of ``patients`` replaced."""
        if self.key is None:
            return text
        for p in sorted({str(p) for p in patients if p}, key=len, reverse=True):
            text = text.replace(p, self.patient(p))
        return text

    def quintuple(self, q):
        """A :class:`~kneeprep.formats.quintuples.Quintuple` with its sample, volume and patient ids replaced."""
        if self.key is None:
            return q
        return dataclasses.replace(
            q,
            sample_id=self.prefixed(q.sample_id, q.patient_id),
            volume_id=self.prefixed(q.volume_id, q.patient_id),
            patient_id=self.patient(q.patient_id),
        )


__all__ = ["DIGITS", "Pseudonymizer"]

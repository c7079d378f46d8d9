"""Tests of fsrecrypt.store: the local directory store and S3 (moto, a cut-short HTTP body)."""

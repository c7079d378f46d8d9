"""Tests of fsrecrypt.keys: the local keyring, AWS KMS (moto) and interop with the official ESDK."""

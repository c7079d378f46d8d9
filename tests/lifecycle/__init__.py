"""Tests of fsrecrypt.lifecycle and its commands: audit, rotation, holds, erasure, verify."""

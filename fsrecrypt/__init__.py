"""fsrecrypt: encrypt FreeSWITCH call recordings the moment they stop.

The package is laid out along the data's path: ESL event (``esl``) -> job
(``pipeline``) -> encryptor (``format``) -> key provider (``keys``) -> object
store (``store``) -> database (``db``). Importing the package itself is cheap on
purpose: heavy dependencies (boto3, psycopg2, gevent) are imported only by the
modules that need them, so ``fsrecrypt --help`` starts fast.
"""

__version__ = "0.1.0"

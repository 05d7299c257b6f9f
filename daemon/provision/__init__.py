"""Generated least-privilege broker configuration (``mtor broker``).

A *broker directory* holds everything a Mosquitto 2 broker of one realm needs,
generated from the realm's accounts (:mod:`daemon.accounts`): ``mosquitto.conf``,
the password file, the ACL made from each account's role, a locally generated
CA and server certificate, and one ready client directory per account.

* :mod:`.acl` — the topics each role may read and write (pure functions);
* :mod:`.passwd` — Mosquitto's PBKDF2-SHA512 password file;
* :mod:`.tls` — the CA and server certificate, made with the ``openssl`` command;
* :mod:`.conf` — ``mosquitto.conf`` and the client configurations (pure);
* :mod:`.brokerdir` — the directory itself: init, add, rotate, revoke, reload.
"""

# Repo root on sys.path so tests import `common` and `embedded` as a user's checkout would.

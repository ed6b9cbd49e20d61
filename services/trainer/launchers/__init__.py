"""`JobLauncher` implementations: `local` (subprocesses) and `kubernetes` (Jobs).

Import the one you need; `kubernetes` pulls in the Kubernetes client, `local` does not.
"""

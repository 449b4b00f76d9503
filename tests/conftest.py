pytest_plugins = ["deploy.pytest_plugin"]

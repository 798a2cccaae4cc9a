"""A1111 installer hook (runs at WebUI start-up with the WebUI's Python). Installs only the build helpers of the
optional fused ops, and only if missing. Never installs or upgrades torch: MemSafe uses the WebUI's own."""

try:
    import launch

    for package in ("ninja", "pybind11"):
        if not launch.is_installed(package):
            launch.run_pip(f"install {package}", f"{package} (MemSafe's optional fused ops)")
except Exception as error:  # noqa: BLE001 - a failed optional install must never stop the WebUI
    print(f"MemSafe: could not install build helpers ({error}); the PyTorch reference ops will be used")

"""`python -m fcmae.runtime.launch MODULE [args...]`: see fcmae.runtime.launch.launcher."""

from fcmae.runtime.launch.launcher import main

main()

/* pause: the sandbox's infrastructure process for a Kata pod (the pause bundle of the cvm-agent extension image).
 *
 * It holds the pod's namespaces open and does nothing else: sleeps until SIGINT or SIGTERM (exit 0) and reaps any
 * child re-parented to it while it is PID 1 of the pod. Built with `gcc -static` so it runs in an empty rootfs.
 */
#include <errno.h>
#include <signal.h>
#include <string.h>
#include <sys/wait.h>
#include <unistd.h>

static void stop(int signum) {
    (void)signum;
    _exit(0);
}

static void reap(int signum) {
    (void)signum;
    int saved = errno;
    while (waitpid(-1, NULL, WNOHANG) > 0) {
    }
    errno = saved;
}

static int handle(int signum, void (*handler)(int)) {
    struct sigaction action;
    memset(&action, 0, sizeof action);
    action.sa_handler = handler;
    action.sa_flags = SA_RESTART;
    sigemptyset(&action.sa_mask);
    return sigaction(signum, &action, NULL);
}

int main(int argc, char **argv) {
    (void)argv;
    if (argc > 1) {
        static const char usage[] = "pause: takes no arguments\n";
        (void)!write(STDERR_FILENO, usage, sizeof usage - 1);
        return 2;
    }
    if (handle(SIGINT, stop) < 0 || handle(SIGTERM, stop) < 0 || handle(SIGCHLD, reap) < 0) {
        return 1;
    }
    for (;;) {
        pause();
    }
}

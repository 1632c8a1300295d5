// go_spawn RSS_BYTES N BUDGET_SECS: touches RSS_BYTES of heap, then times
// up to N runs of /bin/true through os/exec (CLONE_VM|CLONE_VFORK inside),
// stopping after BUDGET_SECS. Prints "median_ns count".
package main

import (
	"fmt"
	"os"
	"os/exec"
	"sort"
	"strconv"
	"time"
)

func main() {
	rss, _ := strconv.Atoi(os.Args[1])
	n, _ := strconv.Atoi(os.Args[2])
	budget, _ := strconv.Atoi(os.Args[3])
	ballast := make([]byte, rss)
	for i := 0; i < len(ballast); i += 4096 {
		ballast[i] = 1
	}
	var times []time.Duration
	var spent time.Duration
	for i := 0; i < n && spent < time.Duration(budget)*time.Second; i++ {
		start := time.Now()
		if err := exec.Command("/bin/true").Run(); err != nil {
			panic(err)
		}
		took := time.Since(start)
		spent += took
		times = append(times, took)
	}
	sort.Slice(times, func(a, b int) bool { return times[a] < times[b] })
	fmt.Println(times[len(times)/2].Nanoseconds(), len(times))
	ballast[0] = 2 // keep it alive
}

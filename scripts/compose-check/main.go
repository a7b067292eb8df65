// compose-check loads a Compose file with compose-go, the library `docker compose` loads files
// with, and checks what the loader leaves to the Docker engine. It needs no engine.
//
//	compose-check [--profile NAME]... [--env-file FILE]... FILE
//
// The loader does what `docker compose config` does: schema validation, interpolation (from the
// process environment, the --env-file files, else the .env beside FILE), profiles, path
// resolution and its own consistency checks (undefined networks, volumes, required depends_on).
// On top of that, for the services the given profiles enable, it checks that:
//
//   - the loader printed no warning (an unset variable is an error, not a blank string),
//   - every bind-mounted host path exists inside the project directory,
//   - every build context and Dockerfile exists,
//   - every image has an explicit tag other than "latest", or a digest,
//   - every depends_on names a defined service that the same profiles enable (or is
//     marked required: false),
//   - no two services publish the same host port.
//
// COMPOSE_PROFILES is ignored: only --profile selects profiles, so a run is reproducible.
//
// On success it prints the resolved model as JSON (services with their profiles, image, build,
// published ports, bind mounts relative to the project directory and dependencies; the services
// the profiles leave out; the variables the file references) and exits 0. Otherwise it prints
// one "compose-check: error: ..." line per problem on stderr and exits 1 (2 for bad usage).
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"github.com/compose-spec/compose-go/v2/cli"
	"github.com/compose-spec/compose-go/v2/template"
	"github.com/compose-spec/compose-go/v2/types"
	"github.com/distribution/reference"
	"github.com/sirupsen/logrus"
)

type stringList []string

func (l *stringList) String() string     { return strings.Join(*l, ",") }
func (l *stringList) Set(v string) error { *l = append(*l, v); return nil }

// Report is what a successful run prints.
type Report struct {
	File             string             `json:"file"`
	Profiles         []string           `json:"profiles"`
	Services         map[string]Service `json:"services"`
	DisabledServices []string           `json:"disabled_services"`
	// Variables the file references, with their default (null when it has none).
	Variables map[string]*string `json:"variables"`
}

// Service is one enabled service, resolved.
type Service struct {
	Profiles  []string `json:"profiles"`
	Image     string   `json:"image,omitempty"`
	Build     *Build   `json:"build,omitempty"`
	Ports     []string `json:"ports"`
	Mounts    []Mount  `json:"mounts"`
	DependsOn []string `json:"depends_on"`
}

// Build is a build section with paths relative to the project directory.
type Build struct {
	Context    string `json:"context"`
	Dockerfile string `json:"dockerfile"`
}

// Mount is a bind mount with its source relative to the project directory.
type Mount struct {
	Source   string `json:"source"`
	Target   string `json:"target"`
	ReadOnly bool   `json:"read_only"`
}

// warningHook collects what the loader logs at warning level or above.
type warningHook struct{ messages []string }

func (h *warningHook) Levels() []logrus.Level {
	return []logrus.Level{logrus.PanicLevel, logrus.FatalLevel, logrus.ErrorLevel, logrus.WarnLevel}
}

func (h *warningHook) Fire(entry *logrus.Entry) error {
	h.messages = append(h.messages, entry.Message)
	return nil
}

func main() {
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	flags := flag.NewFlagSet("compose-check", flag.ContinueOnError)
	flags.SetOutput(stderr)
	var profiles, envFiles stringList
	flags.Var(&profiles, "profile", "profile to enable (repeatable)")
	flags.Var(&envFiles, "env-file", "env file for interpolation (repeatable; default: .env beside FILE)")
	if err := flags.Parse(args); err != nil {
		return 2
	}
	if flags.NArg() != 1 {
		fmt.Fprintln(stderr, "usage: compose-check [--profile NAME]... [--env-file FILE]... FILE")
		return 2
	}
	report, problems := check(flags.Arg(0), profiles, envFiles)
	if len(problems) > 0 {
		for _, p := range problems {
			fmt.Fprintf(stderr, "compose-check: error: %s\n", p)
		}
		return 1
	}
	out, err := json.MarshalIndent(report, "", "  ")
	if err != nil {
		fmt.Fprintf(stderr, "compose-check: error: %v\n", err)
		return 1
	}
	fmt.Fprintln(stdout, string(out))
	return 0
}

func check(file string, profiles, envFiles []string) (*Report, []string) {
	hook := &warningHook{}
	logrus.SetOutput(io.Discard)
	logrus.AddHook(hook)

	abs, err := filepath.Abs(file)
	if err != nil {
		return nil, []string{err.Error()}
	}
	if profiles == nil {
		profiles = []string{}
	}
	ctx := context.Background()
	project, err := load(ctx, abs, profiles, envFiles, true)
	var problems []string
	if err != nil {
		problems = append(problems, fmt.Sprintf("%s: %v", file, err))
	}
	for _, message := range dedupe(hook.messages) {
		problems = append(problems, fmt.Sprintf("%s: the loader warns: %s", file, message))
	}
	if err != nil {
		// The loader stops at its first error; load again without its consistency checks so
		// the checks below can still name every dependency and mount problem.
		if project, err = load(ctx, abs, profiles, envFiles, false); err != nil {
			return nil, problems
		}
	}

	report := &Report{
		File:             file,
		Profiles:         profiles,
		Services:         map[string]Service{},
		DisabledServices: sortedKeys(project.DisabledServices),
		Variables:        map[string]*string{},
	}
	if model, err := rawModel(ctx, abs, envFiles); err == nil {
		for name, v := range template.ExtractVariables(model, template.DefaultPattern) {
			if v.DefaultValue != "" || v.PresenceValue != "" {
				value := v.DefaultValue
				report.Variables[name] = &value
			} else {
				report.Variables[name] = nil
			}
		}
	} else {
		problems = append(problems, fmt.Sprintf("%s: %v", file, err))
	}

	published := map[string]string{}
	for _, name := range sortedKeys(project.Services) {
		s := project.Services[name]
		out, serviceProblems := checkService(project, s, published)
		report.Services[name] = out
		for _, p := range serviceProblems {
			problems = append(problems, fmt.Sprintf("service %q: %s", name, p))
		}
	}
	return report, problems
}

func load(ctx context.Context, abs string, profiles, envFiles []string, consistency bool) (*types.Project, error) {
	options, err := cli.NewProjectOptions([]string{abs},
		cli.WithOsEnv,
		cli.WithEnvFiles(envFiles...),
		cli.WithDotEnv,
		cli.WithProfiles(profiles),
		cli.WithResolvedPaths(true),
		cli.WithConsistency(consistency),
	)
	if err != nil {
		return nil, err
	}
	return options.LoadProject(ctx)
}

// rawModel is the file's model before interpolation, to list the variables it references.
func rawModel(ctx context.Context, abs string, envFiles []string) (map[string]any, error) {
	options, err := cli.NewProjectOptions([]string{abs},
		cli.WithOsEnv,
		cli.WithEnvFiles(envFiles...),
		cli.WithDotEnv,
		cli.WithInterpolation(false),
		cli.WithNormalization(false),
	)
	if err != nil {
		return nil, err
	}
	return options.LoadModel(ctx)
}

func checkService(project *types.Project, s types.ServiceConfig, published map[string]string) (Service, []string) {
	var problems []string
	out := Service{
		Profiles:  nonNil(s.Profiles),
		Image:     s.Image,
		Ports:     []string{},
		Mounts:    []Mount{},
		DependsOn: sortedKeys(s.DependsOn),
	}
	dir := project.WorkingDir

	if s.Image != "" {
		if p := checkImage(s.Image); p != "" {
			problems = append(problems, p)
		}
	}
	if s.Build != nil {
		context := s.Build.Context
		dockerfile := s.Build.Dockerfile
		if dockerfile == "" {
			dockerfile = "Dockerfile"
		}
		if !filepath.IsAbs(dockerfile) {
			dockerfile = filepath.Join(context, dockerfile)
		}
		out.Build = &Build{Context: relative(dir, context), Dockerfile: relative(dir, dockerfile)}
		if p := checkInProject(dir, context, "build context"); p != "" {
			problems = append(problems, p)
		} else if s.Build.DockerfileInline == "" {
			if p := checkInProject(dir, dockerfile, "Dockerfile"); p != "" {
				problems = append(problems, p)
			}
		}
	}

	for _, v := range s.Volumes {
		if v.Type != types.VolumeTypeBind {
			continue
		}
		out.Mounts = append(out.Mounts, Mount{Source: relative(dir, v.Source), Target: v.Target, ReadOnly: v.ReadOnly})
		if p := checkInProject(dir, v.Source, "bind mount source"); p != "" {
			problems = append(problems, fmt.Sprintf("%s (mounted at %s)", p, v.Target))
		}
	}

	for _, port := range s.Ports {
		protocol := port.Protocol
		if protocol == "" {
			protocol = "tcp"
		}
		spec := fmt.Sprintf("%d/%s", port.Target, protocol)
		if port.Published != "" {
			spec = port.Published + ":" + spec
			if port.HostIP != "" {
				spec = port.HostIP + ":" + spec
			}
			key := port.HostIP + ":" + port.Published + "/" + protocol
			if other, taken := published[key]; taken {
				problems = append(problems, fmt.Sprintf("publishes host port %s/%s, already published by service %q", port.Published, protocol, other))
			} else {
				published[key] = s.Name
			}
		}
		out.Ports = append(out.Ports, spec)
	}

	for _, dep := range out.DependsOn {
		if _, enabled := project.Services[dep]; enabled {
			continue
		}
		disabled, defined := project.DisabledServices[dep]
		switch {
		case !defined:
			problems = append(problems, fmt.Sprintf("depends_on unknown service %q", dep))
		case s.DependsOn[dep].Required:
			problems = append(problems, fmt.Sprintf(
				"depends_on %q, which is only in profiles %v: not started with profiles %v (add the profile to %q, or mark the dependency required: false)",
				dep, disabled.Profiles, project.Profiles, s.Name))
		}
	}
	return out, problems
}

// checkImage requires a tag other than "latest", or a digest: the stack must be reproducible.
func checkImage(image string) string {
	named, err := reference.ParseNormalizedNamed(image)
	if err != nil {
		return fmt.Sprintf("image %q: %v", image, err)
	}
	if _, digested := named.(reference.Digested); digested {
		return ""
	}
	tagged, ok := named.(reference.Tagged)
	if !ok || tagged.Tag() == "latest" {
		return fmt.Sprintf("image %q is not pinned: give it a version tag", image)
	}
	return ""
}

// checkInProject is "" when path exists inside dir, else what is wrong with it.
func checkInProject(dir, path, what string) string {
	rel := relative(dir, path)
	if rel == ".." || strings.HasPrefix(rel, "../") || filepath.IsAbs(rel) {
		return fmt.Sprintf("%s %s is outside the project directory %s", what, path, dir)
	}
	if _, err := os.Stat(path); err != nil {
		if errors.Is(err, os.ErrNotExist) {
			return fmt.Sprintf("%s %s does not exist", what, rel)
		}
		return fmt.Sprintf("%s %s: %v", what, rel, err)
	}
	return ""
}

func relative(dir, path string) string {
	rel, err := filepath.Rel(dir, path)
	if err != nil {
		return path
	}
	return filepath.ToSlash(rel)
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	return keys
}

func dedupe(values []string) []string {
	seen := map[string]bool{}
	var out []string
	for _, v := range values {
		if !seen[v] {
			seen[v] = true
			out = append(out, v)
		}
	}
	return out
}

func nonNil(values []string) []string {
	if values == nil {
		return []string{}
	}
	return values
}
